"""SIGKILL `python -m dallm fit` at named moments, resume with `--ckpt_path last`, end where a straight run ends.

Each kill lands at an exact moment, the same on every run of the suite whatever the machine's speed or
load: the test hook `DALLM_TEST_CHECKPOINT_PAUSE` (dallm.resume) holds a checkpoint write half-done or just
done until the test kills the process. The moments: inside the first `last.ckpt` write (the resume falls
back to `step=000002.ckpt`), inside a step checkpoint's write (its temp file is removed), just after a
`last.ckpt` write and before that step's metrics are logged, and inside a `last.ckpt` write while an older
`last.ckpt` is still there (the resume takes the newer `step=000006.ckpt`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dallm.cli import main
from dallm.resume import TEST_PAUSE_ENV

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--model.pretrained_model_name_or_path", str(ROOT / "assets/tiny/base"),
        "--data.teacher_dir", str(ROOT / "assets/tiny/teacher"),
        "--data.prior_dir", str(tmp / "prior"),
        "--data.num_prior_images", "4",
        "--data.batch_size", "2",
        "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
        "--trainer.logger.init_args.name", name,
        "--trainer.max_steps", str(STEPS),
        "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1",
        "--checkpoint.every_n_train_steps", "2",
        "--kid.every_n_steps", "0",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def killed_at(tmp: Path, ckpts: Path, hold: str, *extra: str) -> str:
    """Run `dallm fit` in a subprocess, SIGKILL it where the hook `hold` ("NAME:mid|after") holds it.

    Returns the process's output (it must not have ended on its own).
    """
    name, _, _ = hold.rpartition(":")
    marker = ckpts / f".{name}.held"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", TEST_PAUSE_ENV: hold}
    log = tmp / f"proc{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dallm", *args(tmp, "killed", *extra)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            # No deadline of its own: the hold is a state the run reaches, however slow the machine.
            while not marker.exists():
                assert proc.poll() is None, f"ended before {hold}:\n{log.read_text()[-3000:]}"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    marker.unlink()
    return log.read_text()


def curves(run: Path, tag: str) -> dict[int, float]:
    """{step: value} of a scalar over every events file of a run dir, the later write winning."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        acc = EventAccumulator(str(events)).Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigkill_at_each_named_moment_then_resume_matches_a_straight_run(tmp_path, capsys):
    main(args(tmp_path, "straight"))  # also generates the class images both runs share
    ckpts = tmp_path / "logs" / "killed" / "version_0" / "checkpoints"

    # 1. Inside the first last.ckpt write (step 2): only step=000002.ckpt is whole.
    killed_at(tmp_path, ckpts, "last.ckpt:mid")
    assert (ckpts / "step=000002.ckpt").is_file() and not (ckpts / "last.ckpt").exists()
    assert any(ckpts.glob(".last.ckpt.*.tmp"))

    # 2. Resumed from step 2, killed inside the step-4 checkpoint's write.
    out = killed_at(tmp_path, ckpts, "step=000004.ckpt:mid", "--ckpt_path", "last")
    assert "resuming" in out and "step=000002.ckpt" in out
    assert any(ckpts.glob(".step=000004.ckpt.*.tmp"))  # the half-written temp file is left behind
    assert step_of(ckpts / "last.ckpt") == 2  # the resume made last.ckpt the checkpoint it resumed

    # 3. Resumed from step 2 again, killed just after last.ckpt of step 4 is complete: that step's train
    #    metrics and its validation are not logged yet.
    killed_at(tmp_path, ckpts, "last.ckpt:after", "--ckpt_path", "last")
    assert step_of(ckpts / "last.ckpt") == 4 and not any(ckpts.glob(".*.tmp"))

    # 4. Resumed from step 4, killed inside last.ckpt's write of step 6: step=000006.ckpt is whole and newer
    #    than the last.ckpt beside it, so `last` means step 6.
    killed_at(tmp_path, ckpts, "last.ckpt:mid", "--ckpt_path", "last")
    assert step_of(ckpts / "last.ckpt") == 4 and step_of(ckpts / "step=000006.ckpt") == 6

    # 5. Resume to the end in-process.
    capsys.readouterr()
    main(args(tmp_path, "killed", "--ckpt_path", "last"))
    out = capsys.readouterr().out
    assert "last.ckpt holds step 4, step=000006.ckpt is newer" in out
    assert not list(ckpts.glob("*.tmp")) and not list(ckpts.glob(".*.tmp"))
    assert not list(ckpts.glob("last-v*.ckpt"))
    assert not (tmp_path / "logs" / "killed" / "version_1").exists()  # every resume continued version_0

    straight_run = tmp_path / "logs" / "straight" / "version_0"
    straight = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    assert step_of(ckpts / "last.ckpt") == STEPS
    assert straight.keys() == resumed.keys() and straight
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), (key, (straight[key] - resumed[key]).abs().max())
    # What a kill costs in the curves (Lightning's order, not dallm's): ModelCheckpoint saves step k in
    # on_train_batch_end; the train/* metrics of that batch (TensorBoard step k-1) and the validation due
    # at step k (val/loss at step k-1) are logged only after it. A kill between the two resumes after that
    # batch and that validation, so those points are never written: moments 1, 3 and 4 lose steps 1, 3 and
    # 5 (at 1 and 4 the kill lands inside the last.ckpt write that follows the step checkpoint). Moment 2
    # loses nothing (the resume restarts before the step it killed). Every point written is bit-identical.
    lost = {1, 3, 5}
    for tag in ("train/loss", "train/lr_lora", "val/loss"):
        a, b = curves(straight_run, tag), curves(ckpts.parent, tag)
        assert set(b) == set(a) - lost and set(b), (tag, a, b)
        assert {step: a[step] for step in b} == b, tag
