"""Resume contract: a resumed run trains exactly what its checkpoint holds, or is refused before any write.

`--ckpt_path last` finds the newest run of the logger name (falling back to its newest readable
`step=*.ckpt` when `last.ckpt` is missing, empty or truncated); the checkpoint is read with
`weights_only=True` (no code runs from it); flags that change the model's shape or meaning must equal the
checkpoint's, and flags that may change (max_steps, KID cadence, logging, ...) are honoured and printed.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dallm.errors import DallmError
from dallm.manifest import save_bytes_atomic

# Flags whose value is part of what a checkpoint *is*: hparams Lightning stores in the checkpoint.
# A resume with another value would train something else (or crash on a shape mismatch), so it is refused.
MODEL_CONTRACT = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "rank",
    "alpha",
    "lora_dropout",
    "target_modules",
    "train_text_encoder",
    "text_encoder_target_modules",
    "placeholder_tokens",
    "initializer_token",
    "token_lr",
    "prior_loss_weight",
    "uncond_loss_weight",
    "hold_weight",
    "hold_prompts",
    "hold_latents",
    "uncond_latents",
    "instance_guidance_scale",
    "instance_guidance_anchor",
    "ema_decay",
    "snr_gamma",
)  # instance_prompt, class_prompt and seed are linked from --data.*, compared there
DATA_CONTRACT = (
    "teacher_dir",
    "num_teacher_images",
    "num_val_images",
    "instance_prompt",
    "class_prompt",
    "num_prior_images",
    "resolution",
    "center_crop",
    "random_flip",
    "batch_size",
    "seed",
)
# The optimizer's own settings are restored from the checkpoint's optimizer state, so a changed value
# would be silently ignored: compared against the LoRA param group (initial_lr: before any schedule).
OPTIMIZER_CONTRACT = ("lr", "weight_decay", "betas", "eps")
# Flags that may change on resume; a change is honoured (config.yaml records it) and printed.
MAY_CHANGE = (
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.log_every_n_steps",
    "checkpoint.every_n_train_steps",
    "kid.every_n_steps",
    "kid.num_samples",
)

_STEP_CKPT = re.compile(r"step=(\d+)\.ckpt")


# Test hook (tests/test_kill.py, tests/test_sweep.py): "PATH_SUFFIX:mid" holds the first write of a checkpoint
# whose path ends with PATH_SUFFIX half-written, "PATH_SUFFIX:after" holds it just after the file is complete
# (before the step's metrics are logged); either way a marker `.NAME.held` appears beside it and the
# process sleeps until the test kills it, so each kill lands at exactly the moment the test names.
TEST_PAUSE_ENV = "DALLM_TEST_CHECKPOINT_PAUSE"


def _test_hold(path: Path) -> str | None:
    """The phase ("mid" or "after") at which to hold this write, or None (always None outside the tests)."""
    spec = os.environ.get(TEST_PAUSE_ENV, "")
    suffix, _, phase = spec.rpartition(":")
    if not suffix or not str(path).endswith(suffix) or phase not in ("mid", "after"):
        return None
    return phase


def _hold_forever(path: Path) -> None:
    (path.parent / f".{path.name}.held").touch()
    time.sleep(3600)


def _write_in_halves(path: Path):
    """A writer that holds `path`'s half-written temp file (see TEST_PAUSE_ENV)."""

    def write(fh, data: bytes) -> None:
        fh.write(data[: len(data) // 2])
        fh.flush()
        _hold_forever(path)
        fh.write(data[len(data) // 2 :])

    return write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with a write that is atomic in the checkpoint's own directory.

    Lightning writes a checkpoint to a temp file in the *system* temp dir and moves it over; when that is
    another file system the move is a copy, and a kill during it leaves a truncated `last.ckpt` (and a
    0-byte temp file in /tmp). Here the temp file `.NAME.XXXX.tmp` sits next to the checkpoint, is fsynced
    and `os.replace`d, so a reader sees the old file or the new one; a killed write leaves only the hidden
    temp file, which a resume removes. Loading always uses `weights_only=True`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        data = buf.getvalue()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hold = _test_hold(path)
        save_bytes_atomic(data, path, write=_write_in_halves(path) if hold == "mid" else None)
        if hold == "after":
            _hold_forever(path)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        # A checkpoint from someone else is code under a full unpickle; dallm's hold only tensors and data.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: str | Path, flag: str = "--ckpt_path") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` (tensors and plain data only; no pickled code runs).

    Raises:
        DallmError: naming `flag` and the file when it is missing, empty, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise DallmError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False: never for a file one did not make oneself.
        raise DallmError(
            f"{flag} {path}: not a checkpoint dallm loads (it is no torch file, or it holds pickled objects "
            "beyond tensors and plain data, which could run code)"
        ) from err
    except Exception as err:  # RuntimeError (truncated zip), EOFError (empty file), ...: not readable
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DallmError(f"{flag} {path}: not a readable checkpoint ({type(err).__name__}: {first})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise DallmError(f"{flag} {path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def readable(path: Path) -> bool:
    try:
        load_checkpoint(path)
    except DallmError:
        return False
    return True


def newest_readable(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume in a run's `checkpoints/` dir: the readable one of the highest step.

    That is last.ckpt, unless a kill landed between a step's `step=N.ckpt` and its `last.ckpt` (Lightning
    writes them in that order), or last.ckpt is missing, empty or truncated: then the newest readable
    `step=*.ckpt`. Returns the path (or None) and notes on what was skipped, for the user.
    """
    notes = []
    last = checkpoints / "last.ckpt"
    last_step = -1
    if last.is_file():
        try:
            last_step = int(load_checkpoint(last).get("global_step", 0))
        except DallmError:
            notes.append(f"{last} is unreadable ({last.stat().st_size} bytes)")
    steps = sorted(
        (p for p in checkpoints.glob("step=*.ckpt") if _STEP_CKPT.fullmatch(p.name)),
        key=lambda p: int(_STEP_CKPT.fullmatch(p.name).group(1)),
        reverse=True,
    )
    for p in steps:
        if int(_STEP_CKPT.fullmatch(p.name).group(1)) <= last_step:
            break
        if readable(p):
            if last_step >= 0:
                notes.append(f"{last} holds step {last_step}, {p.name} is newer")
            return p, notes
        notes.append(f"{p} is unreadable")
    return (last if last_step >= 0 else None), notes


def stale_checkpoint_temps(checkpoints: Path) -> list[Path]:
    """Temp files a killed checkpoint write left in a run's checkpoints/ (`.NAME.*.tmp`, or `*.tmp*`)."""
    if not checkpoints.is_dir():
        return []
    return sorted({p for pattern in ("*.tmp*", ".*.tmp") for p in checkpoints.glob(pattern) if p.is_file()})


def tidy(paths: list[Path], resumed: str | Path | None = None) -> None:
    """After an accepted resume: remove stale temp files, and make last.ckpt the checkpoint being resumed.

    An unreadable last.ckpt is set aside (`last.ckpt.unreadable`), an older one replaced: `last` must mean
    the newest, for the user and for the next `--ckpt_path last`. Only called when no writer of the run lives.
    """
    for p in paths:
        if p.name == "last.ckpt":
            if p.is_file() and not readable(p):
                aside = p.with_name("last.ckpt.unreadable")
                p.replace(aside)
                print(f"dallm: moved the unreadable {p} to {aside.name}")
        else:
            p.unlink(missing_ok=True)
            print(f"dallm: removed {p} (left by a killed checkpoint write)")
    if resumed is not None and any(p.name == "last.ckpt" for p in paths):
        resumed = Path(resumed)
        save_bytes_atomic(resumed.read_bytes(), resumed.parent / "last.ckpt")
        print(f"dallm: last.ckpt is now a copy of {resumed.name}, the newest checkpoint")


def resolve_last_checkpoint(cfg) -> list[Path]:
    """Make `--ckpt_path last` resume the newest run of this logger name, in its own run directory.

    Lightning's own "last" looks only in the new run's (empty) version directory and then starts from
    scratch with a warning; here it finds `<save_dir>/<name>/version_k/checkpoints/last.ckpt` (or, when
    that is missing or unreadable after a kill, the newest readable `step=*.ckpt`, saying so), resumes
    from it and keeps logging into version_k so the TensorBoard curves continue.

    Returns the files to tidy once the resume is accepted (see `tidy`): nothing is touched here, so a
    refused resume writes nothing.
    """
    if cfg.get("ckpt_path") != "last":
        return []
    logger = cfg.trainer.get("logger")
    init = getattr(logger, "init_args", None)
    if init is None:
        return []  # no TensorBoard logger to follow: leave "last" to Lightning's checkpoint dirs
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
    for run in reversed(candidates):
        found, notes = newest_readable(run / "checkpoints")
        if found is None:
            continue
        for note in notes:
            print(f"dallm: {note}; falling back to {found}")
        cfg.ckpt_path = str(found)
        init.version = int(run.name.split("_")[1]) if re.fullmatch(r"version_\d+", run.name) else run.name
        print(f"dallm: resuming {cfg.ckpt_path}")
        checkpoints = run / "checkpoints"
        last = checkpoints / "last.ckpt"
        # Not the newest: unreadable or older. tidy() sets it aside or replaces it once the resume is accepted.
        behind = [last] if found != last else []
        return behind + stale_checkpoint_temps(checkpoints)
    raise DallmError(
        f"--ckpt_path last: no readable checkpoints/last.ckpt or step=*.ckpt under {root}/version_*: "
        "nothing to resume"
    )


def _plain(value: Any) -> Any:
    """Config values as plain comparable data (Namespaces -> dicts, tuples -> lists)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _get(cfg, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return None
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return _plain(node)


# What the weights themselves are: all that `validate` needs to match (it scores, it does not train).
SHAPE_CONTRACT = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "rank",
    "alpha",
    "target_modules",
    "train_text_encoder",
    "text_encoder_target_modules",
    "placeholder_tokens",
)


# Scheduler arguments that are its position, not its settings (jsonargparse fills them with defaults).
SCHEDULER_STATE = {"last_epoch", "verbose"}


def contract_differences(cfg, ckpt: dict[str, Any], training: bool = True) -> list[str]:
    """`--flag checkpoint-value vs given-value` for every contract flag that differs from the checkpoint.

    `training=False` (validate) compares only the flags that define the weights (SHAPE_CONTRACT).
    """
    diffs = []
    hp = ckpt.get("hyper_parameters") or {}
    for key in MODEL_CONTRACT if training else SHAPE_CONTRACT:
        if key in hp and _plain(hp[key]) != _get(cfg, f"model.{key}"):
            diffs.append(f"--model.{key} {_plain(hp[key])!r} vs {_get(cfg, f'model.{key}')!r}")
    if not training:
        return diffs
    dhp = ckpt.get("datamodule_hyper_parameters") or {}
    for key in DATA_CONTRACT:
        if key in dhp and _plain(dhp[key]) != _get(cfg, f"data.{key}"):
            diffs.append(f"--data.{key} {_plain(dhp[key])!r} vs {_get(cfg, f'data.{key}')!r}")
    groups = [g for s in ckpt.get("optimizer_states") or [] for g in s.get("param_groups", [])]
    lora = next((g for g in groups if g.get("name") == "lora"), None)
    given = _get(cfg, "model.optimizer.init_args") or {}
    if lora is not None:
        for key in OPTIMIZER_CONTRACT:
            held = lora.get("initial_lr", lora.get("lr")) if key == "lr" else lora.get(key)
            if key in given and held is not None and _plain(held) != _plain(given[key]):
                diffs.append(f"--model.optimizer.{key} {_plain(held)!r} vs {_plain(given[key])!r}")
    # The schedule's settings live in its state, which Lightning restores over the new scheduler: a
    # changed total_iters / T_max / ... would be silently ignored, so it is refused like the rest.
    sched_states = ckpt.get("lr_schedulers") or []
    sched_args = _get(cfg, "model.lr_scheduler.init_args") or {}
    if sched_states and isinstance(sched_states[0], dict):
        for key, value in sched_args.items():
            if key in SCHEDULER_STATE:
                continue  # where the schedule is, not what it is: restored from the checkpoint
            held = sched_states[0].get(key)
            if key in sched_states[0] and _plain(held) != _plain(value):
                diffs.append(f"--model.lr_scheduler.{key} {_plain(held)!r} vs {_plain(value)!r}")
    return diffs


def check_resume(cfg, subcommand: str) -> None:
    """Refuse (before anything is written) a `--ckpt_path` whose model differs from the given flags.

    `cfg` is the subcommand's parsed config; `ckpt_path` is already resolved (see resolve_last_checkpoint).
    Prints the flags that may change and did (they are honoured; config.yaml records the new values).
    """
    path = cfg.get("ckpt_path")
    if not path:
        return
    ckpt = load_checkpoint(path)
    diffs = contract_differences(cfg, ckpt, training=subcommand == "fit")
    if diffs:
        raise DallmError(
            f"--ckpt_path {path}: the checkpoint holds another model than these flags ask for "
            f"(checkpoint vs given): {'; '.join(diffs)}. A resumed run trains (and validate scores) what the "
            "checkpoint holds: drop these flags, or start a new run without --ckpt_path"
        )
    if subcommand != "fit":
        return
    # The run's previous config (the one SaveConfigCallback will overwrite) says what it ran with.
    saved = Path(path).parent.parent / "config.yaml"
    try:
        before = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    except (OSError, yaml.YAMLError):
        before = None
    if not isinstance(before, dict):
        return
    for key in MAY_CHANGE:
        old, new = _get(before, key), _get(cfg, key)
        if old != new:
            print(f"dallm: resume: --{key} {old!r} -> {new!r} (honoured; recorded in {saved})")
