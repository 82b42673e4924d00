"""The command table: `python -m dallm COMMAND ...`; fit and validate through LightningCLI, the rest as typed functions."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import warnings

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dallm import preflight
from dallm.callbacks import (
    HParamsLog,
    KIDEarlyStopping,
    LoraExport,
    StepProgressBar,
    best_checkpoint,
    best_checkpoint_callback,
    run_dir,
)
from dallm.contract import ContractRecord
from dallm.data.datamodule import DallmDataModule
from dallm.errors import PARSER_KWARGS, error_boundary
from dallm.measure.callback import KIDCallback
from dallm.module import DallmModule
from dallm.ranges import Count, Seed, plain_numbers
from dallm.resume import (  # noqa: F401 (resolve_last_checkpoint: public name of this module before)
    SIGTERM_EXIT,
    SigtermCheckpoint,
    lock_run,
    release_runs,
    resolve_last_checkpoint,
    sigterm_message,
)
from dallm.trainer import DallmTrainer

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "dallm"},
    },
    # The data module shards its step-indexed stream itself (exact resume, one shard per rank).
    "use_distributed_sampler": False,
    "max_steps": 1000,
    # One "epoch" is the whole run, so validation is scheduled in steps, not epochs.
    "check_val_every_n_epoch": None,
    "val_check_interval": 250,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    # Checkpoints written atomically next to themselves, loaded with weights_only=True (dallm.resume).
    "plugins": {"class_path": "dallm.resume.AtomicCheckpointIO"},
}


# Commands outside LightningCLI: `python -m dallm NAME ARGS...` calls "module:function"(ARGS) -> exit status.
# One line per command; each is a typed function under jsonargparse or its own small parser.
COMMANDS = {
    "kid": "dallm.measure.command:kid_main",
    "teacher": "dallm.teacher.command:teacher_main",
    "sample": "dallm.export.sample:sample_main",
    "export": "dallm.export.command:export_main",
    "sweep": "dallm.sweep.command:sweep_main",
    "report": "dallm.sweep.report:report_main",
}


# `dallm --help`: every command with one line, in the order a run meets them.
SUMMARY = {
    "teacher": "collect teacher images into a directory (OpenAI Images API, a diffusers pipeline, a folder)",
    "fit": "train a LoRA + placeholder tokens toward the teacher images, KID every N steps (LightningCLI)",
    "validate": "the held-out diffusion loss of a checkpoint (LightningCLI)",
    "kid": "KID between image folders, or the relative KID test of two generated folders",
    "sample": "images from a trained LoRA the way a diffusers user loads it, beside the base if asked",
    "export": "a checkpoint or export in the formats other tools load (diffusers, kohya, a1111)",
    "sweep": "a grid of `dallm fit` runs x seeds, on this machine or through submitit (SLURM)",
    "report": "KID curves, tables and relative tests of a sweep, or one run's figure",
}


def overview() -> str:
    """The text of `dallm --help` (and of `dallm` alone): usage and one line per command."""
    width = max(map(len, SUMMARY))
    lines = [f"  {name:<{width}}  {text}" for name, text in SUMMARY.items()]
    return "\n".join(
        [
            "usage: dallm COMMAND [ARGS...]   (python -m dallm COMMAND ...)",
            "",
            "Align a small text-to-image model with a larger one: LoRA + pivotal tokens, measured with KID.",
            "",
            "commands:",
            *lines,
            "",
            "dallm COMMAND --help: the command's flags.",
        ]
    )


class DallmCLI(LightningCLI):
    """LightningCLI with dallm's links, forced callbacks and resume-in-place."""

    def __init__(self, *args, trainer_class=DallmTrainer, **kwargs) -> None:
        # DallmTrainer: Lightning's Trainer with the range of each numeric flag in its type.
        super().__init__(*args, trainer_class=trainer_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_default_arguments_to_parser(self, parser) -> None:
        # Lightning's, with the seed's range (numpy's, which seed_everything enforces) in its type.
        parser.add_argument(
            "--seed_everything",
            type=bool | Seed,
            default=self.seed_everything_default,
            help="The run's seed (0 .. 2^32-1): data order, noise, LoRA and token init, KID sampling seeds; "
            "true: a random one (recorded in config.yaml); false: no seeding.",
        )

    def add_arguments_to_parser(self, parser) -> None:
        # One source of truth: the base model and the prompt are set once, under --model / --data.
        for key in ("pretrained_model_name_or_path", "revision", "variant"):
            parser.link_arguments(f"model.{key}", f"data.{key}")
        parser.link_arguments("data.instance_prompt", "model.instance_prompt")
        parser.link_arguments("data.class_prompt", "model.class_prompt")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 250,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step={step:06d}",
                "checkpoint.auto_insert_metric_name": False,
                # A resumed (or copied) run overwrites last.ckpt instead of writing last-v1.ckpt beside it,
                # which the next `--ckpt_path last` would never read.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(LoraExport, "export")
        parser.add_lightning_class_args(KIDCallback, "kid")
        parser.add_argument(
            "--early_stopping.patience",
            type=Count | None,
            default=None,
            help="Stop when kid/val has not improved for this many KID rounds (Lightning's EarlyStopping); "
            "null: never.",
        )
        parser.add_lightning_class_args(HParamsLog, "hparams")
        # One seed: --seed_everything decides the run; --data.seed (order, augmentation, noise, timesteps,
        # LoRA/token init) and --kid.seed (sampling seeds) are overrides that default to it.
        parser.set_defaults({"data.seed": None, "kid.seed": None})
        parser.link_arguments(("data.seed", "seed_everything"), "model.seed", compute_fn=resolve_seed)
        parser.set_defaults(
            {
                "model.optimizer": {
                    "class_path": "torch.optim.AdamW",
                    "init_args": {"lr": 1e-4, "weight_decay": 1e-2},
                }
            }
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would copy the checkpoint's hparams over the given flags (silently training another
        # model than asked for); dallm checks them against the checkpoint instead (preflight.check_config).
        return

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        # Range-typed values (dallm.ranges) as plain numbers: hyperparameters go into checkpoints.
        plain_numbers(cfg)
        link_cosine_length(cfg)
        # Written back into the config, so config.yaml records the seeds the run actually used.
        for key in ("data.seed", "kid.seed"):
            if key in cfg:
                cfg[key] = resolve_seed(cfg[key], cfg.get("seed_everything"))
        if "model.seed" in cfg and "data.seed" in cfg:
            cfg["model.seed"] = cfg["data.seed"]  # the link ran at parse time, before `true` became a seed
        # Everything that needs only the config, the tokenizer or a file listing, before any write.
        preflight.check_config(cfg, self.subcommand)

    def instantiate_trainer(self, **kwargs):
        """The trainer, plus the step-counting progress bar and, for fit, the best-KID checkpoint and early stop."""
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = cfg.get("trainer", {})
        user = trainer_cfg.get("callbacks") or []
        user = user if isinstance(user, list) else [user]
        has_bar = any(isinstance(c, ProgressBar) for c in user)
        if trainer_cfg.get("enable_progress_bar") is not False and not has_bar:
            kwargs["callbacks"] = [*user, StepProgressBar()]
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            # What a resume must keep (dallm.contract), and a resumable last.ckpt on SIGTERM.
            trainer.callbacks += [ContractRecord(), SigtermCheckpoint()]
            # Appended after the KID callback: its round at a step must run before they read kid/val.
            kid = cfg["kid"]
            trainer.callbacks.append(best_checkpoint(kid.every_n_steps if kid.enabled else 0))
            patience = cfg.get("early_stopping", {}).get("patience")
            if patience is not None:
                if not kid.enabled:
                    raise ValueError("--early_stopping.patience needs KID rounds: set --kid.every_n_steps > 0")
                trainer.callbacks.append(KIDEarlyStopping(patience))
        return trainer

    def before_fit(self) -> None:
        # One writer per run directory for the life of the fit (a resume locked it in preflight already).
        lock_run(run_dir(self.trainer), "--trainer.logger")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            # Lightning ends a SIGTERMed run with SystemExit(None), exit status 0: it would read as finished.
            if self.trainer.is_global_zero:
                what = sigterm_message(self.trainer) if subcommand == "fit" else "dallm: stopped by SIGTERM"
                print(what, file=sys.stderr, flush=True)
            raise SystemExit(SIGTERM_EXIT) from None

    def after_fit(self) -> None:
        trainer = self.trainer
        out = run_dir(trainer)  # a collective under DDP: every rank must ask
        if trainer.is_global_zero:
            print(f"dallm: run directory {out}")
            print(f"  TensorBoard: tensorboard --logdir {out.parent}")
            print(f"  checkpoints: {out / 'checkpoints'}   (resume: --ckpt_path last)")
            print(f"  LoRA + token embeddings: {out / 'lora' / 'last'}   (look at it: python -m dallm sample --lora {out})")
            from dallm.export.card import trigger_summary

            trigger = trigger_summary(out / "lora" / "last")
            if trigger:
                print(trigger)
            kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
            rounds = [h for h in kid.history if "kid/val" in h] if kid is not None else []
            if rounds:
                print(f"  sample grids: {out / 'samples'}")
                first, last = rounds[0], rounds[-1]
                best = best_checkpoint_callback(trainer)
                best_json = out / "lora" / "best" / "dallm.json"
                shown = ""
                if best is not None and best.best_model_score is not None and best_json.is_file():
                    b = json.loads(best_json.read_text())
                    shown = f" (best: step {b['step']} {with_se(b, 'kid/val')}, {out / 'lora' / 'best'})"
                print(
                    f"  kid/val: step {first['step']} {with_se(first, 'kid/val')} -> step {last['step']} "
                    f"{with_se(last, 'kid/val')}" + shown
                )
                from dallm.measure.readouts import summary_line

                for entry in (first, last):  # the base's readouts, then the trained model's
                    if summary_line(entry):
                        print(f"  readouts, step {entry['step']}: {summary_line(entry)}")


def with_se(entry: dict, key: str) -> str:
    """`0.0113 ± 0.0040` from a KID round's entry (the value alone when it has no standard error)."""
    se = entry.get(f"{key}_se")
    return f"{entry[key]:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def link_cosine_length(cfg) -> None:
    """A cosine schedule's T_max follows --trainer.max_steps: one source of truth for the run's length.

    A T_max other than the run's length would stop the decay early or, past T_max, raise the rate again.
    """
    sched = cfg.get("model", {}).get("lr_scheduler") if cfg.get("model") else None
    max_steps = cfg.get("trainer", {}).get("max_steps") if cfg.get("trainer") else None
    if sched is None or not sched.get("class_path") or not isinstance(max_steps, int) or max_steps < 1:
        return
    from jsonargparse._util import import_object

    try:
        cls = import_object(sched.class_path)
    except Exception:
        return
    if isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.CosineAnnealingLR):
        if sched.init_args.get("T_max") != max_steps:
            print(f"dallm: --model.lr_scheduler.init_args.T_max follows --trainer.max_steps: {max_steps}")
        sched.init_args.T_max = max_steps


def resolve_seed(override: int | None, seed_everything: int | bool | None) -> int:
    """A component's seed: its own override if given, else the run's --seed_everything (0 when that is off)."""
    if override is not None:
        return int(override)
    return seed_everything if isinstance(seed_everything, int) and not isinstance(seed_everything, bool) else 0


def cli_kwargs() -> dict:
    """How `main` builds the CLI (`build_parser` builds the same parser without running)."""
    return dict(
        model_class=DallmModule,
        datamodule_class=DallmDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        # A run is a function of its config: no random seed unless asked for (--seed_everything true).
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # Argument errors raise (one line at the boundary) instead of printing the whole usage.
        parser_kwargs={
            **PARSER_KWARGS,
            "prog": "dallm",  # not `__main__.py`: `python -m dallm fit --help` reads `usage: dallm fit ...`
            **{name: dict(PARSER_KWARGS) for name in DallmCLI.subcommands()},
        },
    )


class _Built(Exception):
    """Raised by `_ParserOnly` with the parser it built: nothing is parsed, instantiated or run."""


class _ParserOnly(DallmCLI):
    def parse_arguments(self, parser, args) -> None:
        raise _Built(parser)


def build_parser():
    """The `dallm fit|validate` parser exactly as `main` builds it (subcommands included), without running.

    `dallm sweep` parses every run's flags with it before launching; tests enumerate its flags.
    """
    try:
        _ParserOnly(**cli_kwargs(), args=[])
    except _Built as built:
        return built.args[0]
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _releasing_run_locks():
    try:
        yield
    finally:
        release_runs()


def main(args: ArgsType = None) -> DallmCLI | None:
    """Entry point of `python -m dallm` and the `dallm` script; tests call it in-process.

    Every command runs inside `error_boundary`: bad input is one line `dallm: error: ...`, exit 2.
    """
    argv = sys.argv[1:] if args is None else args
    command = argv[0] if isinstance(argv, (list, tuple)) and argv and isinstance(argv[0], str) else ""
    if isinstance(argv, (list, tuple)) and (not argv or argv[0] in ("-h", "--help")):
        print(overview())
        raise SystemExit(0 if argv else 2)  # `dallm` alone names no command: a usage error, after the list
    with error_boundary(command), _releasing_run_locks():
        if command in COMMANDS:
            # Not a training command: no LightningCLI around it.
            module, func = COMMANDS[command].split(":")
            raise SystemExit(getattr(importlib.import_module(module), func)(list(argv[1:])))
        if isinstance(argv, (list, tuple)):
            preflight.check_config_files([str(a) for a in argv])
        # The frozen VAE/text encoder are in eval mode on purpose (see DallmModule.train).
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        cli = DallmCLI(**cli_kwargs(), args=args)
        # Lightning leaves the process group up; a gloo group still alive at interpreter exit can abort
        # the process ("terminate called without an active exception") after a run that succeeded.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return cli
