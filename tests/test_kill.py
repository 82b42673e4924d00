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


# ------------------------------------------------------------------ SIGTERM, two writers, a copied run


def signalled_at(tmp: Path, ckpts: Path, hold: str, sig: int, name: str, *extra: str) -> tuple[str, int]:
    """Run `dallm fit` in a subprocess, send `sig` where the hook `hold` holds it, and let it end by itself.

    Returns its output and exit status. A handled signal (SIGTERM) lets the held write finish.
    """
    marker = ckpts / f".{hold.rpartition(':')[0]}.held"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", TEST_PAUSE_ENV: hold}
    log = tmp / f"proc{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dallm", *args(tmp, name, *extra)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            while not marker.exists():
                assert proc.poll() is None, f"ended before {hold}:\n{log.read_text()[-3000:]}"
                time.sleep(0.01)
            proc.send_signal(sig)
            proc.wait(timeout=900)  # a guard against a hang only: the run ends on its own
        finally:
            if proc.poll() is None:
                proc.kill()
    marker.unlink()
    return log.read_text(), proc.returncode


@pytest.mark.slow
def test_sigterm_saves_the_step_exits_143_and_the_resume_loses_nothing(tmp_path, capsys):
    """Issue 25, item 2: a preempted fit (SIGTERM) read as finished (exit 0, no checkpoint of its step)."""
    main(args(tmp_path, "straight"))
    ckpts = tmp_path / "logs" / "termed" / "version_0" / "checkpoints"
    # SIGTERM while step=000004.ckpt is being written: the write finishes, the step's validation and metrics
    # are written, then Lightning's stop lands and the step is saved as last.ckpt.
    out, code = signalled_at(tmp_path, ckpts, "step=000004.ckpt:mid", signal.SIGTERM, "termed")
    assert code == 143, out[-3000:]
    assert "dallm: stopped by SIGTERM at step 4 of 8: saved step 4 to" in out and "--ckpt_path last" in out
    assert step_of(ckpts / "last.ckpt") == 4 and not any(ckpts.glob(".*.tmp"))
    assert not (ckpts / "step=000006.ckpt").exists()

    capsys.readouterr()
    main(args(tmp_path, "termed", "--ckpt_path", "last"))
    assert "resuming" in capsys.readouterr().out
    straight_run = tmp_path / "logs" / "straight" / "version_0"
    straight = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    assert step_of(ckpts / "last.ckpt") == STEPS and straight.keys() == resumed.keys() and straight
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # Nothing lost: every point of every curve is there, bit-identical (unlike a SIGKILL, test above).
    for tag in ("train/loss", "train/lr_lora", "val/loss"):
        a, b = curves(straight_run, tag), curves(ckpts.parent, tag)
        assert a == b and a, (tag, a, b)


@pytest.mark.slow
def test_a_second_writer_of_a_run_is_refused_naming_the_holder(tmp_path, capsys):
    """Item 3: two `--ckpt_path last` at once interleaved into one version_0 (step=...-v1.ckpt, last-v2.ckpt)."""
    main(args(tmp_path, "run", "--trainer.max_steps", "4"))
    run = tmp_path / "logs" / "run" / "version_0"
    ckpts = run / "checkpoints"
    marker = ckpts / ".step=000006.ckpt.held"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    resume = [sys.executable, "-m", "dallm", *args(tmp_path, "run", "--ckpt_path", "last")]
    first = subprocess.Popen(resume, cwd=ROOT, env={**env, TEST_PAUSE_ENV: "step=000006.ckpt:after"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not marker.exists():  # the first resume is writing: held just after its step-6 checkpoint
            assert first.poll() is None, "the first resume ended before its step-6 checkpoint"
            time.sleep(0.01)
        before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}
        second = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}
    finally:
        first.kill()
        first.wait()
    line = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert line.startswith(f"dallm: error: --ckpt_path: {run.absolute()} is being written by another dallm fit")
    assert f"pid {first.pid} on " in line
    assert after == before  # the refused writer touched nothing
    # The holder was killed: its OS lock went with it, and the next resume runs to the end, alone.
    marker.unlink()
    main(args(tmp_path, "run", "--ckpt_path", "last"))
    assert step_of(ckpts / "last.ckpt") == STEPS
    assert not [p.name for p in ckpts.iterdir() if "-v" in p.name]  # no step=...-v1.ckpt, no last-v1.ckpt
    assert not (run.parent / "version_1").exists()


@pytest.mark.slow
def test_a_copied_run_resumes_into_its_own_last_ckpt(tmp_path, capsys):
    """Item 4: a copied run resumed into last-v1.ckpt, and `last` kept meaning the older last.ckpt."""
    import shutil

    main(args(tmp_path, "orig", "--trainer.max_steps", "4"))
    shutil.copytree(tmp_path / "logs", tmp_path / "elsewhere")
    moved = ("--trainer.logger.init_args.save_dir", str(tmp_path / "elsewhere"))
    main(args(tmp_path, "orig", *moved, "--ckpt_path", "last", "--trainer.max_steps", "6"))
    ckpts = tmp_path / "elsewhere" / "orig" / "version_0" / "checkpoints"
    assert step_of(ckpts / "last.ckpt") == 6
    assert not [p.name for p in ckpts.iterdir() if "-v" in p.name]
    capsys.readouterr()
    main(args(tmp_path, "orig", *moved, "--ckpt_path", "last"))  # `last` is the newest: step 6, on to 8
    assert f"dallm: resuming {ckpts / 'last.ckpt'}" in capsys.readouterr().out
    assert step_of(ckpts / "last.ckpt") == STEPS and not [p.name for p in ckpts.iterdir() if "-v" in p.name]


@pytest.mark.slow
def test_sweep_records_a_sigtermed_run_as_interrupted_and_resumes_it(tmp_path):
    """Item 2 for `dallm sweep`: a run that ended by SIGTERM is not done; the same sweep resumes it."""
    import json

    extra = args(tmp_path, "unused")[3:]  # the fit flags after the config, as the sweep passes them
    cut = extra.index("--trainer.logger.init_args.save_dir")
    extra = extra[:cut] + extra[cut + 4 :]  # the sweep places each run's logs itself
    cmd = [sys.executable, "-m", "dallm", "sweep", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--grid", "model.rank=4", "--seeds", "0", "--save_dir", str(tmp_path / "sweeps"), "--name", "s",
           "--", *extra]  # fmt: skip
    run = tmp_path / "sweeps" / "s" / "rank=4,seed=0"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    hold = {TEST_PAUSE_ENV: "rank=4,seed=0/checkpoints/step=000004.ckpt:mid"}
    sweep = subprocess.Popen(cmd, cwd=ROOT, env={**env, **hold}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not (run / "checkpoints" / ".step=000004.ckpt.held").exists():
            assert sweep.poll() is None, sweep.stdout.read()
            time.sleep(0.01)
        pid = json.loads((run / "sweep_run.json").read_text())["pid"]
        os.kill(pid, signal.SIGTERM)  # the run is preempted (the sweep itself is not)
        output, _ = sweep.communicate(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    record = json.loads((run / "sweep_run.json").read_text())
    assert sweep.returncode == 1 and record["status"] == "interrupted" and record["returncode"] == 143, output
    assert "interrupted (exit 143; the same sweep resumes it)" in output
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "1 to resume" in again.stdout, again.stdout + again.stderr
    assert json.loads((run / "sweep_run.json").read_text())["status"] == "done"
    assert step_of(run / "checkpoints" / "last.ckpt") == STEPS
