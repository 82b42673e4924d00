"""The resume contract: which flags a resumed run must keep, which it may change, and the check itself.

A resumed run trains exactly what its checkpoint holds. Every setting that changes what trains (or what
the KID curve measures) is in a contract list below and must equal the checkpoint's, else the resume is
refused before anything is written, naming each flag with both values. Settings that may change are
honoured and printed (MAY_CHANGE), or change neither the weights nor the curves (SAFE, with the reason).
`tests/test_bad_inputs.py` checks that every flag of `dallm fit` is in exactly one of these lists.

Where the checkpoint says what it was made with:
- model and data flags: the hyperparameters Lightning stores (`hyper_parameters`, `datamodule_hyper_parameters`);
- the optimizer's settings: its saved param groups (`initial_lr`: the rate before any schedule);
- the schedule's settings: the scheduler's saved state;
- the rest (optimizer and schedule classes, trainer arithmetic, world size, KID sampling): the record
  `ContractRecord` writes into every checkpoint (`dallm_contract`), else the run's config.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.fabric.connector import _convert_precision_to_unified_args

from dallm.errors import DallmError

# Hyperparameters of the module that define what trains (instance_prompt and seed: compared under data).
MODEL_CONTRACT = (
    "pretrained_model_name_or_path", "revision", "variant", "rank", "alpha", "lora_dropout",
    "target_modules", "train_text_encoder", "text_encoder_target_modules", "placeholder_tokens",
    "initializer_token", "token_lr", "prior_loss_weight", "uncond_loss_weight", "hold_weight", "hold_prompts",
    "hold_latents", "uncond_latents", "instance_guidance_scale", "instance_guidance_anchor", "ema_decay",
    "snr_gamma", "noise_offset", "use_dora",
)  # fmt: skip
DATA_CONTRACT = (
    "teacher_dir", "num_teacher_images", "val_teacher_dir", "num_val_images", "instance_prompt",
    "class_prompt", "num_prior_images", "prior_generation_steps", "prior_guidance_scale", "resolution",
    "center_crop", "random_flip", "batch_size", "seed",
)  # fmt: skip
# The optimizer's own settings are restored from its saved state, so a changed value would be silently
# ignored: compared against the LoRA param group.
OPTIMIZER_CONTRACT = ("lr", "weight_decay", "betas", "eps", "momentum", "nesterov", "dampening", "amsgrad")
# Recorded by ContractRecord (else read from the run's config.yaml): what the trainer does with a batch,
# which classes the optimizer and schedule are, and how KID samples (a changed sampler would put two
# measurements on one curve).
RECORDED_CONTRACT = (
    "model.optimizer", "model.lr_scheduler", "trainer.accumulate_grad_batches", "trainer.precision",
    "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm", "world_size", "kid.seed", "kid.feature",
    "kid.weights", "kid.num_inference_steps", "kid.guidance_scale", "kid.scheduler", "kid.subset_size",
    "kid.subsets", "kid.drift_prompts",
)  # fmt: skip
# Flags that may change on resume; a change is honoured (config.yaml records it) and printed. They say how
# long the run goes and how often it is observed, not what one step does.
MAY_CHANGE = (
    "trainer.max_steps", "trainer.max_epochs", "trainer.min_epochs", "trainer.min_steps",
    "trainer.max_time", "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.log_every_n_steps", "trainer.limit_val_batches", "checkpoint.every_n_train_steps",
    "kid.every_n_steps", "kid.num_samples", "early_stopping.patience",
)  # fmt: skip
# Flags that change neither the trained weights nor the curves, with the reason (README: Errors and trust).
_ROUNDING = "kernels or their order: results equal up to float rounding; bitwise resume is promised on the CPU"
SAFE = {
    "model.cache_latents": "the same latents, encoded once instead of every step",
    "model.cache_dir": "where the latent cache lives",
    "model.gradient_checkpointing": "recomputes activations with the same arithmetic",
    "model.channels_last": _ROUNDING,
    "model.compile": _ROUNDING,
    "data.num_workers": "loader processes; the stream is step-indexed",
    "data.prior_dir": "where class images live; their settings are checked against its manifest",
    "data.prior_batch_size": "batching of the missing class images' generation only",
    "kid.batch_size": "sampling batches; each image has its own generator",
    "kid.feature_batch_size": "feature-extractor batches",
    "export.enabled": "what is written at checkpoints",
    "export.formats": "what is written at checkpoints",
    "hparams.enabled": "the TensorBoard HParams summary",
    "checkpoint.dirpath": "where checkpoints go",
    "checkpoint.filename": "their names",
    "checkpoint.monitor": "which are kept",
    "checkpoint.mode": "which are kept",
    "checkpoint.save_top_k": "how many are kept",
    "checkpoint.save_last": "whether last.ckpt is written",
    "checkpoint.save_weights_only": "what a checkpoint holds (a weights-only one cannot be resumed)",
    "checkpoint.save_on_exception": "an extra checkpoint",
    "checkpoint.save_on_train_epoch_end": "when checkpoints are written",
    "checkpoint.every_n_epochs": "when checkpoints are written",
    "checkpoint.train_time_interval": "when checkpoints are written",
    "checkpoint.auto_insert_metric_name": "their names",
    "checkpoint.enable_version_counter": "their names",
    "checkpoint.verbose": "messages",
    "trainer.accelerator": _ROUNDING + " (the world size is in the contract)",
    "trainer.strategy": _ROUNDING,
    "trainer.devices": "compared as the world size (devices x nodes), recorded in the contract",
    "trainer.num_nodes": "compared as the world size (devices x nodes), recorded in the contract",
    "trainer.deterministic": _ROUNDING,
    "trainer.benchmark": _ROUNDING,
    "trainer.logger": "where the curves go (a resume continues the run directory it finds)",
    "trainer.callbacks": "extra observers; dallm's own callbacks are always there",
    "trainer.enable_checkpointing": "whether checkpoints are written",
    "trainer.enable_progress_bar": "the terminal",
    "trainer.enable_model_summary": "the terminal",
    "trainer.enable_autolog_hparams": "what is logged",
    "trainer.profiler": "timing only",
    "trainer.detect_anomaly": "checks only (slower)",
    "trainer.barebones": "logging and checks off",
    "trainer.fast_dev_run": "a smoke test that writes no checkpoint",
    "trainer.num_sanity_val_steps": "validation before training; measurement draws from its own generators",
    "trainer.limit_test_batches": "dallm has no test stage",
    "trainer.limit_predict_batches": "dallm has no predict stage",
    "trainer.limit_train_batches": "fixed: the whole stream (dallm.trainer refuses anything else)",
    "trainer.overfit_batches": "fixed: 0 (dallm.trainer refuses anything else)",
    "trainer.use_distributed_sampler": "fixed: false, the stream shards itself (preflight refuses true)",
    "trainer.reload_dataloaders_every_n_epochs": "a reloaded loader resumes the same step-indexed stream",
    "trainer.sync_batchnorm": "the UNet has no batch norm",
    "trainer.inference_mode": "validation's grad mode; no weights change there",
    "trainer.plugins": "checkpoint IO and cluster environment (precision is --trainer.precision, recorded)",
    "trainer.default_root_dir": "where files go without a logger",
    "trainer.model_registry": "where a model is uploaded",
    "seed_everything": "its effect is compared as --data.seed and --kid.seed, which default to it",
    "weights_only": "fixed: true",
}
# Flags set from others (compared under that name), and the command's own options.
LINKED = ("model.instance_prompt", "model.class_prompt", "model.seed", "data.pretrained_model_name_or_path", "data.revision", "data.variant")
NOT_SETTINGS = ("config", "print_config", "ckpt_path", "help")


def plain(value: Any) -> Any:
    """Config values as plain comparable data (Namespaces -> dicts, tuples -> lists)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def get(cfg, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return None
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return plain(node)


def class_name(obj_or_path: Any) -> str | None:
    """`torch.optim.adamw.AdamW` for a class, an instance or an import path (`torch.optim.AdamW`)."""
    if obj_or_path is None:
        return None
    if isinstance(obj_or_path, str):
        from jsonargparse._util import import_object

        try:
            obj_or_path = import_object(obj_or_path)
        except Exception:
            return obj_or_path
    cls = obj_or_path if isinstance(obj_or_path, type) else type(obj_or_path)
    return f"{cls.__module__}.{cls.__qualname__}"


def precision_name(value: Any) -> str:
    """A --trainer.precision as Lightning resolves it (`32` and null -> `32-true`, `bf16` -> `bf16-mixed`)."""
    return str(_convert_precision_to_unified_args(32 if value is None else value))


def expected_world_size(trainer: Any) -> int | None:
    """The world size the trainer flags give (devices x num_nodes), or None when only Lightning can tell."""
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1) or 1
    if hasattr(devices, "__len__") and not isinstance(devices, str):
        return len(devices) * nodes
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator == "cpu":
        return nodes
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count() * nodes
    return nodes if accelerator == "auto" else None


def config_record(cfg) -> dict[str, Any]:
    """The RECORDED_CONTRACT values this config asks for (None where it cannot say)."""
    clip = get(cfg, "trainer.gradient_clip_val")
    return {
        "model.optimizer": class_name(get(cfg, "model.optimizer.class_path")),
        "model.lr_scheduler": class_name(get(cfg, "model.lr_scheduler.class_path")),
        "trainer.accumulate_grad_batches": get(cfg, "trainer.accumulate_grad_batches") or 1,
        "trainer.precision": precision_name(get(cfg, "trainer.precision")),
        "trainer.gradient_clip_val": clip or None,
        "trainer.gradient_clip_algorithm": (get(cfg, "trainer.gradient_clip_algorithm") or "norm") if clip else None,
        "world_size": expected_world_size(cfg.get("trainer") or {}),
        **{key: get(cfg, key) for key in RECORDED_CONTRACT if key.startswith("kid.")},
    }


class ContractRecord(pl.Callback):
    """Writes what a resume must keep and Lightning does not store (`dallm_contract`) into every checkpoint."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from dallm.measure.callback import KIDCallback

        schedulers, clip = trainer.lr_scheduler_configs, trainer.gradient_clip_val
        algorithm = trainer.gradient_clip_algorithm or "norm"
        record = {
            "model.optimizer": class_name(trainer.optimizers[0]) if trainer.optimizers else None,
            "model.lr_scheduler": class_name(schedulers[0].scheduler) if schedulers else None,
            "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
            "trainer.precision": precision_name(trainer.precision),
            "trainer.gradient_clip_val": clip or None,
            "trainer.gradient_clip_algorithm": str(getattr(algorithm, "value", algorithm)) if clip else None,
            "world_size": trainer.world_size,
        }
        kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
        for key in RECORDED_CONTRACT:
            if key.startswith("kid.") and kid is not None:
                record[key] = plain(getattr(kid, key[4:], None))
        checkpoint["dallm_contract"] = record


def _saved_config(path: str | Path) -> dict | None:
    saved = Path(path).parent.parent / "config.yaml"
    try:
        before = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return before if isinstance(before, dict) else None


def _same(held: Any, given: Any) -> bool:
    if isinstance(held, float) or isinstance(given, float):
        try:
            return float(held) == float(given)
        except (TypeError, ValueError):
            return False
    return plain(held) == plain(given)


def _optimizer_state_mismatch(cfg, lora: dict) -> str | None:
    """For a checkpoint without a record: settings in its optimizer state that the given optimizer lacks."""
    spec = cfg.get("model", {}).get("optimizer") if cfg.get("model") else None
    if spec is None or not spec.get("class_path"):
        return None
    from lightning.pytorch.cli import instantiate_class

    try:
        args = plain(spec.get("init_args")) or {}
        opt = instantiate_class(([torch.nn.Parameter(torch.zeros(1))],), {"class_path": spec.class_path, "init_args": args})
    except Exception:
        return None  # preflight.check_optimizer names the problem
    own = set(opt.param_groups[0]) | {"name", "initial_lr", "params"}
    foreign = sorted(set(lora) - own)
    if foreign:
        return f"--model.optimizer: the checkpoint's optimizer state has settings {foreign} that {spec.class_path} lacks"
    return None


def contract_differences(cfg, ckpt: dict[str, Any], training: bool = True, path: str | Path | None = None) -> list[str]:
    """`--flag checkpoint-value vs given-value` for every contract flag that differs from the checkpoint.

    `training=False` (validate) compares only the flags that define the weights (SHAPE_CONTRACT).
    """
    diffs = []
    hp = ckpt.get("hyper_parameters") or {}
    for key in MODEL_CONTRACT if training else SHAPE_CONTRACT:
        if key in hp and not _same(hp[key], get(cfg, f"model.{key}")):
            diffs.append(f"--model.{key} {plain(hp[key])!r} vs {get(cfg, f'model.{key}')!r}")
    if not training:
        return diffs
    dhp = ckpt.get("datamodule_hyper_parameters") or {}
    for key in DATA_CONTRACT:
        if key in dhp and not _same(dhp[key], get(cfg, f"data.{key}")):
            diffs.append(f"--data.{key} {plain(dhp[key])!r} vs {get(cfg, f'data.{key}')!r}")
    record = ckpt.get("dallm_contract")
    given = config_record(cfg)
    if not isinstance(record, dict) and path is not None and _saved_config(path) is not None:
        record = config_record(_saved_config(path))
        record["world_size"] = None  # what the old run's devices resolved to is not in its config
    groups = [g for s in ckpt.get("optimizer_states") or [] for g in s.get("param_groups", [])]
    lora = next((g for g in groups if g.get("name") == "lora"), None)
    # How KID samples matters only to a curve that goes on: KID on now, and rounds in the checkpoint.
    kid_state = next((v for k, v in (ckpt.get("callbacks") or {}).items() if k.startswith("KIDCallback")), {})
    measured = bool(get(cfg, "kid.every_n_steps")) and bool((kid_state or {}).get("history"))
    if isinstance(record, dict):
        for key in RECORDED_CONTRACT:
            if key.startswith("kid.") and not measured:
                continue
            held, now = record.get(key), given.get(key)
            if key == "kid.feature":  # a name or a class_path; an earlier version's name for the same net
                from dallm.measure.feature_spec import canonical_feature

                held, now = canonical_feature(held), canonical_feature(now)
            unknown = key == "world_size" and (held is None or now is None)  # only Lightning could tell
            # Checkpoints before issue 21 recorded kid.drift_prompts as None (the callback had no such attribute).
            unknown = unknown or (key == "kid.drift_prompts" and held is None)
            if key in record and not unknown and not _same(held, now):
                flag = "--trainer.devices x --trainer.num_nodes (world size)" if key == "world_size" else f"--{key}"
                diffs.append(f"{flag} {held!r} vs {now!r}")
    elif lora is not None:
        mismatch = _optimizer_state_mismatch(cfg, lora)
        if mismatch:
            diffs.append(mismatch)
    optimizer_changed = any(d.startswith("--model.optimizer") for d in diffs)
    args = get(cfg, "model.optimizer.init_args") or {}
    if lora is not None and not optimizer_changed:
        for key in OPTIMIZER_CONTRACT:
            held = lora.get("initial_lr", lora.get("lr")) if key == "lr" else lora.get(key)
            if key in args and held is not None and not _same(held, args[key]):
                diffs.append(f"--model.optimizer.{key} {plain(held)!r} vs {plain(args[key])!r}")
    # The schedule's settings live in its state, which Lightning restores over the new scheduler: a
    # changed total_iters / T_max / ... would be silently ignored, so it is refused like the rest.
    sched_states = ckpt.get("lr_schedulers") or []
    sched_args = get(cfg, "model.lr_scheduler.init_args") or {}
    if sched_states and isinstance(sched_states[0], dict) and not any("lr_scheduler " in d for d in diffs):
        for key, value in sched_args.items():
            if key in SCHEDULER_STATE or key not in sched_states[0]:
                continue  # where the schedule is, not what it is: restored from the checkpoint
            held = sched_states[0].get(key)
            if not _same(held, value):
                linked = " (it follows --trainer.max_steps)" if key == "T_max" else ""
                diffs.append(f"--model.lr_scheduler.{key} {plain(held)!r} vs {plain(value)!r}{linked}")
    return diffs


# What the weights themselves are: all that `validate` needs to match (it scores, it does not train).
SHAPE_CONTRACT = (
    "pretrained_model_name_or_path", "revision", "variant", "rank", "alpha", "target_modules",
    "train_text_encoder", "text_encoder_target_modules", "placeholder_tokens", "use_dora",
)  # fmt: skip
# Scheduler arguments that are its position, not its settings (jsonargparse fills them with defaults).
SCHEDULER_STATE = {"last_epoch", "verbose"}


def check_resume(cfg, subcommand: str) -> None:
    """Refuse (before anything is written) a `--ckpt_path` whose model differs from the given flags.

    `cfg` is the subcommand's parsed config; `ckpt_path` is already resolved (see resolve_last_checkpoint).
    Prints the flags that may change and did (they are honoured; config.yaml records the new values).
    """
    from dallm.resume import load_checkpoint

    path = cfg.get("ckpt_path")
    if not path:
        return
    ckpt = load_checkpoint(path)
    diffs = contract_differences(cfg, ckpt, training=subcommand == "fit", path=path)
    if diffs:
        raise DallmError(
            f"--ckpt_path {path}: the checkpoint was made with other settings than these flags "
            f"(checkpoint vs given): {'; '.join(diffs)}. A resumed run trains (and validate scores) what the "
            "checkpoint holds, the way it was trained: drop these flags, or start a new run without --ckpt_path"
        )
    if subcommand != "fit":
        return
    # The run's previous config (the one SaveConfigCallback will overwrite) says what it ran with.
    before = _saved_config(path)
    if before is None:
        return
    for key in MAY_CHANGE:
        old, new = get(before, key), get(cfg, key)
        if old != new:
            saved = Path(path).parent.parent / "config.yaml"
            print(f"dallm: resume: --{key} {old!r} -> {new!r} (honoured; recorded in {saved})")
