"""`dallm sweep`: grid expansion and run names, skip/resume/refuse, and end to end on the tiny model:
the local and submitit launchers give the same run dirs and weights as single `dallm fit` calls, a
killed sweep resumes to the weights of an uninterrupted run, a crashed run fails alone, HParams are
readable from the event files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dallm.cli import main
from dallm.resume import TEST_PAUSE_ENV
from dallm.sweep.command import (
    Run,
    expand,
    parse_grid_item,
    prepare,
    run_name,
    sweep,
    sweep_main,
    write_record,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
GRID = ["model.rank=1,4", "data.num_teacher_images=4,8"]
NAMES = [f"rank={r},num_teacher_images={n},seed={s}" for r in (1, 4) for n in (4, 8) for s in (0, 1)]


# ------------------------------------------------------------------------------------------ fast
def test_grid_expands_to_named_runs_in_order() -> None:
    runs = expand([dict(parse_grid_item(g) for g in GRID)], [0, 1])
    assert sorted(r.name for r in runs) == sorted(NAMES)
    assert runs[0] == Run(
        "rank=1,num_teacher_images=4,seed=0", (("model.rank", "1"), ("data.num_teacher_images", "4")), 0
    )


def test_union_of_grids_runs_a_shared_cell_once() -> None:
    grids = [{"model.rank": [1, 4, 16], "data.num_teacher_images": [20]},
             {"model.rank": [4], "data.num_teacher_images": [5, 20, 50]}]  # fmt: skip
    names = [r.name for r in expand(grids, [0])]
    assert len(names) == 5 and names.count("rank=4,num_teacher_images=20,seed=0") == 1
    with pytest.raises(ValueError, match="same flags"):
        expand([{"model.rank": [1]}, {"data.num_teacher_images": [5]}], [0])


def test_names_are_safe_and_keys_disambiguated() -> None:
    name = run_name((("model.seed", "1"), ("data.seed", "2"), ("data.teacher_dir", "data/cats x")), 3)
    assert name == "model.seed=1,data.seed=2,teacher_dir=data_cats_x,seed=3"
    with pytest.raises(ValueError, match="KEY=V1"):
        parse_grid_item("model.rank")


def test_dry_run_parses_the_natural_spellings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--config", str(TINY), "--grid", GRID[0], "--grid", GRID[1], "--seeds", "0,1", "--save_dir",
            str(tmp_path), "--name", "s", "--dry_run", "--", "--trainer.max_steps", "3"]  # fmt: skip
    assert sweep_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" ")[0] for line in lines] == NAMES
    assert all(line.endswith("--trainer.max_steps 3") and "[new]" in line for line in lines)
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
    assert sweep_main(["--config", str(TINY), "--launcher", "slurm"]) == 2


def test_prepare_skips_resumes_and_refuses_other_flags(tmp_path: Path) -> None:
    run, d = Run("a", (("model.rank", "1"),), 0), tmp_path / "a"
    args = ["fit", "--model.rank", "1"]
    assert prepare(run, d, args) == args  # new
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert prepare(run, d, args) == [*args, "--ckpt_path", "last"]  # interrupted: resume
    write_record(d, status="done")
    assert prepare(run, d, args) is None  # finished: skip
    with pytest.raises(ValueError, match="other flags"):
        prepare(run, d, ["fit", "--model.rank", "2"])


def test_new_run_without_checkpoint_starts_clean(tmp_path: Path) -> None:
    run, d = Run("a", (), 0), tmp_path / "a"
    prepare(run, d, ["fit"])
    (d / "events.out.tfevents.1").write_bytes(b"half a run")
    assert prepare(run, d, ["fit"]) == ["fit"]
    assert sorted(p.name for p in d.iterdir()) == ["sweep_run.json"]


# ------------------------------------------------------------------------------------------ end to end
def common(tmp: Path, steps: int = 2, kid: int = 0) -> list[str]:
    return [
        "--model.pretrained_model_name_or_path", str(ROOT / "assets/tiny/base"),
        "--data.teacher_dir", str(ROOT / "assets/tiny/teacher"),
        "--data.prior_dir", str(tmp / "prior"), "--data.num_prior_images", "4", "--data.batch_size", "2",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
        "--checkpoint.every_n_train_steps", "2", "--kid.every_n_steps", str(kid),
        "--kid.num_samples", "4", "--kid.num_inference_steps", "2",
    ]  # fmt: skip


def single_fit(tmp: Path, rank: int, n: int | None, seed: int, extra: list[str], name: str) -> Path:
    """The run as one plain `dallm fit` call would make it, with the logger placed like the sweep's."""
    main(["fit", "--config", str(TINY), "--seed_everything", str(seed),
          "--model.rank", str(rank), *(["--data.num_teacher_images", str(n)] if n else []),
          "--trainer.logger.init_args.save_dir", str(tmp / "ref"), "--trainer.logger.init_args.name", "s",
          "--trainer.logger.init_args.version", name, "--trainer.enable_progress_bar", "false", *extra])  # fmt: skip
    return tmp / "ref" / "s" / name


def layout(run_dir: Path) -> list[str]:
    """Files of a run dir, without the names that hold a time or pid, and without the sweep's record."""
    return sorted(
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and not p.name.startswith("events.out") and p.name != "sweep_run.json"
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {
        f"{f.name}/{k}": v
        for f in sorted((run_dir / "lora/last").glob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def assert_same_run(a: Path, b: Path) -> None:
    """Same files, and the same exported weights, bit for bit."""
    assert layout(a) == layout(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def sweep_cmd(tmp: Path, name: str, grid: list[str], seeds: str, extra: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "dallm", "sweep", "--config", str(TINY), *sum((["--grid", g] for g in grid), []),
            "--seeds", seeds, "--save_dir", str(tmp / "sweeps"), "--name", name, *flags, "--", *extra]  # fmt: skip


def env() -> dict[str, str]:
    # The subprocess runs with this process's thread count: the in-process reference fits must sum their
    # floats in the same order for the weights to be bit-identical (CI leaves OMP_NUM_THREADS unset).
    threads = str(torch.get_num_threads())
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_local_and_submitit_launchers_equal_single_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    extra = common(tmp_path)
    out = subprocess.run(sweep_cmd(tmp_path, "local", GRID, "0,1", extra, "--max_parallel", "2"),
                         env=env(), capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    local = tmp_path / "sweeps" / "local"
    assert sorted(p.name for p in local.iterdir() if p.is_dir() and p.name != "logs") == sorted(NAMES)
    # submitit: the whole grid through its debug executor (in this process), and a run through its local
    # executor (a job process of its own); job ids and logs are recorded.
    assert sweep(str(TINY), grid=GRID, seeds=[0, 1], save_dir=str(tmp_path / "sweeps"), name="debug",
                 launcher="submitit", slurm=_slurm("debug"), extra=extra) == 0  # fmt: skip
    assert sweep(str(TINY), grid=["model.rank=4", "data.num_teacher_images=4"], seeds=[0],
                 save_dir=str(tmp_path / "sweeps"), name="sublocal", launcher="submitit",
                 slurm=_slurm("local"), max_parallel=2, extra=extra) == 0  # fmt: skip
    rec = json.loads(
        (tmp_path / "sweeps/sublocal/rank=4,num_teacher_images=4,seed=0/sweep_run.json").read_text()
    )
    assert (
        rec["status"] == "done" and rec["job_id"] and rec["executor"] == "local" and Path(rec["log"]).exists()
    )
    for name in NAMES:
        r, n, s = (int(part.split("=")[1]) for part in name.split(","))
        ref = single_fit(tmp_path, r, n, s, extra, name)
        assert_same_run(local / name, ref)
        assert_same_run(tmp_path / "sweeps/debug" / name, ref)
        if r == 4 and n == 4 and s == 0:
            assert_same_run(tmp_path / "sweeps/sublocal" / name, ref)
    # Runs with another seed differ (the seed reaches the run).
    a, b = weights(local / NAMES[0]), weights(local / NAMES[1])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # Everything finished: the same sweep again launches nothing.
    assert (
        sweep(
            str(TINY), grid=GRID, seeds=[0, 1], save_dir=str(tmp_path / "sweeps"), name="local", extra=extra
        )
        == 0
    )
    assert "8 finished (skipped)" in capsys.readouterr().out


def _slurm(cluster: str):
    from dallm.sweep.command import SlurmOptions

    return SlurmOptions(cluster=cluster, cpus_per_task=1, time=10)


@pytest.mark.slow
def test_killed_sweep_resumes_crash_fails_alone_and_hparams_read_back(tmp_path: Path) -> None:
    extra = common(tmp_path, steps=6, kid=3)
    # rank 0 is refused by dallm fit: that run fails, the others still run.
    cmd = sweep_cmd(tmp_path, "k", ["model.rank=1,0,4"], "0", extra)
    # Killed while the last run trains, just after its step-2 last.ckpt (the test hook holds it there).
    root = tmp_path / "sweeps" / "k"
    second = root / "rank=4,seed=0"
    hold = {TEST_PAUSE_ENV: "rank=4,seed=0/checkpoints/last.ckpt:after"}
    proc = subprocess.Popen(
        cmd, env={**env(), **hold}, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not (second / "checkpoints" / ".last.ckpt.held").exists():
        assert proc.poll() is None, "sweep ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (second / "checkpoints" / ".last.ckpt.held").unlink()
    assert json.loads((root / "rank=1,seed=0/sweep_run.json").read_text())["status"] == "done"
    assert json.loads((root / "rank=0,seed=0/sweep_run.json").read_text())["status"] == "failed"
    assert (
        not (second / "lora" / "last").exists()
        or json.loads((second / "lora/last/dallm.json").read_text())["global_step"] < 6
    )
    first_events = sorted((root / "rank=1,seed=0").glob("events.out*"))

    out = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr  # the refused run fails again, and says so
    assert "1 finished (skipped), 1 to resume, 1 to start" in out.stdout
    assert "failed: rank=0,seed=0" in out.stderr
    assert sorted((root / "rank=1,seed=0").glob("events.out*")) == first_events  # skipped, untouched
    assert json.loads((second / "sweep_run.json").read_text())["status"] == "done"
    assert "dallm: resuming" in (root / "logs" / "rank=4,seed=0.log").read_text()
    ref = single_fit(tmp_path, 4, None, 0, extra, "rank=4,seed=0")
    assert_same_run(second, ref)  # resumed = uninterrupted, bit for bit

    hp = read_hparams(root / "rank=1,seed=0")
    assert hp["params"]["rank"] == 1 and hp["params"]["seed"] == 0 and hp["params"]["max_steps"] == 6
    assert hp["params"]["num_teacher_images"] == 8 and hp["params"]["base"].endswith("assets/tiny/base")
    assert {"hp/kid_val_start", "hp/kid_val_best", "hp/kid_val_last", "hp/kid_prior_last"} <= set(
        hp["metrics"]
    )
    kid_val = hp["scalars"]["kid/val"]
    assert hp["last"]["hp/kid_val_start"] == pytest.approx(kid_val[0])
    assert hp["last"]["hp/kid_val_best"] == pytest.approx(min(kid_val.values()))
    assert hp["last"]["hp/kid_val_last"] == pytest.approx(kid_val[6])

    # The report regenerates its table from the sweep dirs, and the saved samples give the logged KID back.
    from dallm.sweep.report import report

    assert report(str(root), out=str(tmp_path / "rep" / "r.md")) == 0
    text = (tmp_path / "rep" / "r.md").read_text()
    assert (
        "| rank 1 | 1 | " in text
        and "| rank 4 | 1 | " in text
        and "not finished" in text
        and "rank=0,seed=0" in text
    )
    summary = json.loads((tmp_path / "rep" / "r.json").read_text())
    assert summary["recompute_max_abs_diff"] < 1e-6
    assert [(r["a"], r["b"]) for r in summary["relative"]] == [("rank 1", "rank 4")]
    assert 0 <= summary["relative"][0]["p_value"] <= 1


def read_hparams(run_dir: Path) -> dict:
    """The HParams plugin data of a run, as TensorBoard's HParams tab reads it, and the metric scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
    ssi = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    exp = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    params = {
        k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in ssi.hparams.items()
    }
    scalars = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
    metrics = [m.name.tag for m in exp.metric_infos]
    last = {m: scalars[m][max(scalars[m])] for m in metrics if m in scalars}
    return {"params": params, "metrics": metrics, "scalars": scalars, "last": last}
