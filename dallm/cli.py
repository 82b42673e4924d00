"""Command line: `python -m dallm fit|validate --config C.yaml` (LightningCLI over jsonargparse)."""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI

from dallm.callbacks import HParamsLog, KIDCallback, LoraExport, run_dir
from dallm.data import DallmDataModule
from dallm.module import DallmModule, DivergedError

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
}


# Commands outside LightningCLI: `python -m dallm NAME ARGS...` calls "module:function"(ARGS) -> exit status.
# One line per command; each is a typed function under jsonargparse or its own small parser.
COMMANDS = {
    "kid": "dallm.metrics:kid_main",
    "teacher": "dallm.teacher:teacher_main",
    "sweep": "dallm.sweep:sweep_main",
    "report": "dallm.report:report_main",
}


class DallmCLI(LightningCLI):
    """LightningCLI with dallm's links, forced callbacks and resume-in-place."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser) -> None:
        # One source of truth: the base model and the prompt are set once, under --model / --data.
        for key in ("pretrained_model_name_or_path", "revision", "variant"):
            parser.link_arguments(f"model.{key}", f"data.{key}")
        parser.link_arguments("data.instance_prompt", "model.instance_prompt")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 250,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step={step:06d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LoraExport, "export")
        parser.add_lightning_class_args(KIDCallback, "kid")
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

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        # Written back into the config, so config.yaml records the seeds the run actually used.
        for key in ("data.seed", "kid.seed"):
            if key in cfg:
                cfg[key] = resolve_seed(cfg[key], cfg.get("seed_everything"))
        if "model.seed" in cfg and "data.seed" in cfg:
            cfg["model.seed"] = cfg["data.seed"]  # the link ran at parse time, before `true` became a seed
        if self.subcommand == "fit":
            resolve_last_checkpoint(cfg)

    def after_fit(self) -> None:
        trainer = self.trainer
        out = run_dir(trainer)  # a collective under DDP: every rank must ask
        if trainer.is_global_zero:
            print(f"dallm: run directory {out}")
            print(f"  TensorBoard: tensorboard --logdir {out.parent}")
            print(f"  checkpoints: {out / 'checkpoints'}   (resume: --ckpt_path last)")
            print(f"  LoRA + token embeddings: {out / 'lora' / 'last'}")
            kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
            rounds = [h for h in kid.history if "kid/val" in h] if kid is not None else []
            if rounds:
                print(f"  sample grids: {out / 'samples'}")
                first, last = rounds[0], rounds[-1]
                best = min(rounds, key=lambda h: h["kid/val"])
                print(
                    f"  kid/val: step {first['step']} {with_se(first, 'kid/val')} -> step {last['step']} "
                    f"{with_se(last, 'kid/val')} (best: step {best['step']} {with_se(best, 'kid/val')})"
                )


def with_se(entry: dict, key: str) -> str:
    """`0.0113 ± 0.0040` from a KID round's entry (the value alone when it has no standard error)."""
    se = entry.get(f"{key}_se")
    return f"{entry[key]:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def resolve_seed(override: int | None, seed_everything: int | bool | None) -> int:
    """A component's seed: its own override if given, else the run's --seed_everything (0 when that is off)."""
    if override is not None:
        return int(override)
    return seed_everything if isinstance(seed_everything, int) and not isinstance(seed_everything, bool) else 0


def resolve_last_checkpoint(cfg) -> None:
    """Make `--ckpt_path last` resume the newest run of this logger name, in its own run directory.

    Lightning's own "last" looks only in the new run's (empty) version directory and then starts from
    scratch with a warning; here it finds `<save_dir>/<name>/version_k/checkpoints/last.ckpt`, resumes
    from it and keeps logging into version_k so the TensorBoard curves continue.
    """
    if cfg.get("ckpt_path") != "last":
        return
    logger = cfg.trainer.get("logger")
    init = getattr(logger, "init_args", None)
    if init is None:
        return  # no TensorBoard logger to follow: leave "last" to Lightning's checkpoint dirs
    save_dir = Path(init.get("save_dir") or "lightning_logs")
    name = init.get("name") or ""
    root = save_dir / name
    if init.get("version") is not None:
        candidates = [root / (init.version if isinstance(init.version, str) else f"version_{init.version}")]
    else:
        candidates = sorted(
            (p for p in root.glob("version_*") if re.fullmatch(r"version_\d+", p.name)),
            key=lambda p: int(p.name.split("_")[1]),
        )
    runs = [p for p in candidates if (p / "checkpoints" / "last.ckpt").exists()]
    if not runs:
        raise ValueError(
            f"--ckpt_path last: no checkpoints/last.ckpt under {root}/version_*: nothing to resume"
        )
    run = runs[-1]
    cfg.ckpt_path = str(run / "checkpoints" / "last.ckpt")
    init.version = int(run.name.split("_")[1]) if re.fullmatch(r"version_\d+", run.name) else run.name
    print(f"dallm: resuming {cfg.ckpt_path}")


def main(args: ArgsType = None) -> DallmCLI | None:
    """Entry point of `python -m dallm` and the `dallm` script; tests call it in-process."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] in COMMANDS:
        # Not a training command: no LightningCLI around it.
        module, func = COMMANDS[argv[0]].split(":")
        raise SystemExit(getattr(importlib.import_module(module), func)(list(argv[1:])))
    # The frozen VAE/text encoder are in eval mode on purpose (see DallmModule.train).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    try:
        cli = DallmCLI(
            DallmModule,
            DallmDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            # A run is a function of its config: no random seed unless asked for (--seed_everything true).
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
        # Lightning leaves the process group up; a gloo group still alive at interpreter exit can abort
        # the process ("terminate called without an active exception") after a run that succeeded.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return cli
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, DivergedError) as err:
        # Bad input gets one line naming the culprit, not a 60-line traceback through Lightning.
        if os.environ.get("DALLM_TRACEBACK"):
            raise
        print(f"dallm: error: {err}\n  (DALLM_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from err
