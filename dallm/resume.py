"""Resuming: which checkpoint, written how, by whom, and what SIGTERM leaves to resume from.

`--ckpt_path last` finds the newest run of the logger name (falling back to its newest readable
`step=*.ckpt` when `last.ckpt` is missing, empty or truncated); the checkpoint is read with
`weights_only=True` (no code runs from it) and written atomically (`AtomicCheckpointIO`). One process at a
time writes a run directory (`lock_run`); SIGTERM saves a resumable `last.ckpt` (`SigtermCheckpoint`).
Which flags must equal the checkpoint's is `dallm.contract`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dallm.errors import DallmError
from dallm.manifest import save_bytes_atomic

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
    # Until the test's signal: SIGKILL ends the process here; a handled one (SIGTERM, to which Lightning's
    # handler answers) lets the write finish, as a signal arriving at this moment would.
    signal.pause() if hasattr(signal, "pause") else time.sleep(3600)


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


def resumed_run(cfg) -> Path | None:
    """The run directory a `fit --ckpt_path` continues in place (TensorBoard logger with a version), or None."""
    logger = cfg.trainer.get("logger") if cfg.get("trainer") else None
    init = getattr(logger, "init_args", None)
    if not cfg.get("ckpt_path") or init is None or init.get("version") is None:
        return None
    version = init.version if isinstance(init.version, str) else f"version_{init.version}"
    return Path(init.get("save_dir") or "lightning_logs") / (init.get("name") or "") / version


# ---------------------------------------------------------------------------------- one writer per run

LOCK_NAME = ".lock"  # as the teacher and class-image directories (dallm.manifest.lock_directory)
HOLDER_NAME = ".lock.holder"  # who holds it: pid, host, start time, command (for the refusal message)
_held: dict[Path, Any] = {}


def is_global_zero() -> bool:
    """Whether this process is global rank 0 (from the launcher's environment, before any process group)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def lock_run(run_dir: str | Path, flag: str) -> None:
    """Hold `run_dir`'s lock until `release_runs()` (or the process ends, even by SIGKILL: an OS lock).

    Two fits writing one run directory (two `--ckpt_path last` at once) would interleave checkpoints,
    `last-v1.ckpt`, events and exports; the second is refused in one line naming the holder, before it
    writes anything. Only global rank 0 locks (the other ranks of a DDP run write nothing there).
    """
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir).absolute()
    if run_dir in _held or not is_global_zero():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads((run_dir / HOLDER_NAME).read_text())
            who = f"pid {holder['pid']} on {holder['host']}, since {holder['started']}: {holder['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        raise DallmError(
            f"{flag}: {run_dir} is being written by another dallm fit ({who}); its lock is "
            f"{run_dir / LOCK_NAME}. Wait for it to end (or stop it) and resume with --ckpt_path last, or give "
            "a new run another --trainer.logger.init_args.name"
        ) from None
    _held[run_dir] = lock
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["dallm", *sys.argv[1:]])[:300],
    }
    save_bytes_atomic(json.dumps(holder).encode(), run_dir / HOLDER_NAME)


def release_runs() -> None:
    """Release every run lock this process holds (at the end of a fit, whatever ended it)."""
    for run_dir, lock in list(_held.items()):
        (run_dir / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()
        del _held[run_dir]


# ---------------------------------------------------------------------------------------- SIGTERM

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class SigtermCheckpoint(pl.Callback):
    """On SIGTERM (preemption, `timeout`, Kubernetes, `dallm sweep` stopping its runs): save `last.ckpt`.

    Lightning's own mechanism: its signal handler sets `trainer.received_sigterm`, the training loop raises
    `SIGTERMException` at the end of the step, and this callback's `on_exception` saves that step through
    the trainer's (atomic) checkpoint IO, as Lightning's `OnExceptionCheckpoint` does. `dallm.cli` then
    prints how to resume and exits 143, so a preempted run never reads as finished. The step's validation
    and metrics are written first (`DallmTrainer.received_sigterm`), so nothing is lost. A SIGTERM before
    the first step (class images, model loading) ends the process as the signal does, with nothing to save.
    """

    def __init__(self) -> None:
        self.saved: Path | None = None
        self.step: int | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        from lightning.pytorch.callbacks import ModelCheckpoint

        ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.save_last and c.dirpath), None)
        if ckpt is None:
            return
        path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        # Lightning's restore adds one to the logging step counter (its checkpoints are saved before the
        # step's increment, "batches_that_stepped is never set prior to saving a checkpoint"); saved here,
        # after it, the counter is stored as Lightning expects, so the resumed curves keep their steps.
        loop = trainer.fit_loop.epoch_loop
        loop._batches_that_stepped -= 1
        try:
            trainer.save_checkpoint(path, weights_only=False)
        finally:
            loop._batches_that_stepped += 1
        self.saved, self.step = path, trainer.global_step


def sigterm_message(trainer) -> str:
    """What a run stopped by SIGTERM tells the user (one line): where it stopped and how to resume."""
    cb = next((c for c in trainer.callbacks if isinstance(c, SigtermCheckpoint)), None)
    if cb is not None and cb.saved is not None:
        where = f"saved step {cb.step} to {cb.saved}"
    else:
        where = "no checkpoint saved (no step finished); the newest one before it is kept"
    return (
        f"dallm: stopped by SIGTERM at step {trainer.global_step} of {trainer.max_steps}: {where}. "
        f"Resume with the same command and --ckpt_path last (exit status {SIGTERM_EXIT})"
    )
