"""`dallm report`: tables and plots from a sweep's event files; samples read back from the KID grids."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dallm.sweep.report import families, grid_samples, report, report_main, summarize

# kid/val per (rank, seed) at steps 0, 50, 100; kid/val_se constant per run.
CURVES = {
    (1, 0): [0.040, 0.035, 0.030],
    (1, 1): [0.040, 0.030, 0.034],
    (4, 0): [0.040, 0.012, 0.020],
    (4, 1): [0.040, 0.018, 0.016],
}
SE = {(1, 0): 0.004, (1, 1): 0.006, (4, 0): 0.003, (4, 1): 0.005}


def fake_sweep(root: Path) -> Path:
    """A sweep dir as `dallm sweep` leaves it: run dirs with sweep_run.json and TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter

    sweep = root / "s"
    for (rank, seed), values in CURVES.items():
        d = sweep / f"rank={rank},num_teacher_images=20,seed={seed}"
        d.mkdir(parents=True)
        record = {
            "settings": {"model.rank": str(rank), "data.num_teacher_images": "20"},
            "seed": seed,
            "status": "done",
        }
        (d / "sweep_run.json").write_text(json.dumps(record))
        w = SummaryWriter(str(d))
        for step, v in zip((0, 50, 100), values, strict=True):
            w.add_scalar("kid/val", v, step)
            w.add_scalar("kid/val_se", SE[(rank, seed)], step)
            w.add_scalar("kid/prior", v / 2, step)
        w.close()
    return sweep


def test_table_gives_mean_spread_and_se_per_setting(tmp_path: Path) -> None:
    sweep = fake_sweep(tmp_path)
    assert report(str(sweep), out=str(tmp_path / "out" / "r.md"), relative=False) == 0
    text = (tmp_path / "out" / "r.md").read_text()
    rank4 = np.array([CURVES[(4, 0)], CURVES[(4, 1)]])
    mean, std = rank4.mean(0), rank4.std(0, ddof=1)
    best = int(np.argmin(mean))
    row = next(line for line in text.splitlines() if line.startswith("| rank 4, num_teacher_images 20 |"))
    assert f"{mean[best]:.4f} ± {std[best]:.4f} (se {np.mean([SE[(4, 0)], SE[(4, 1)]]):.4f})" in row
    assert f"({(0, 50, 100)[best]})" in row and f"{mean[-1] / mean[0]:.2f}x (100)" in row
    png = tmp_path / "out" / "r_rank_0.png"
    assert png.stat().st_size > 1000 and f"]({png.name})" in text
    summary = json.loads((tmp_path / "out" / "r.json").read_text())
    assert summary["settings"]["rank 1, num_teacher_images 20"]["kid/val"]["last"]["mean"] == pytest.approx(
        0.032
    )


def test_families_are_settings_that_differ_in_one_flag() -> None:
    keys = [(("r", "1"), ("n", "20")), (("r", "4"), ("n", "20")), (("r", "16"), ("n", "20")),
            (("r", "4"), ("n", "5")), (("r", "4"), ("n", "50"))]  # fmt: skip
    fams = {
        (flag, tuple(fixed.items())): [dict(k)[flag] for k in members]
        for flag, fixed, members in families(keys)
    }
    assert fams == {("r", (("n", "20"),)): ["1", "4", "16"], ("n", (("r", "4"),)): ["5", "20", "50"]}


def test_summary_of_one_seed_has_no_spread() -> None:
    s = summarize([{"kid/val": {0: 0.04, 50: 0.02}}])
    assert s["seeds"] == 1 and s["best"]["step"] == 50 and s["last"]["std"] == 0 and s["last"]["se"] is None


def test_samples_read_back_from_the_kid_grid_exactly(tmp_path: Path) -> None:
    from dallm.measure.callback import KIDCallback

    gen = torch.Generator().manual_seed(0)
    rows = [
        torch.randint(0, 256, (5, 3, 16, 16), generator=gen, dtype=torch.uint8).float() / 255
        for _ in range(2)
    ]
    path = tmp_path / "samples" / "step=000010.png"
    KIDCallback(feature="toy").write_grid(SimpleNamespace(logger=None), rows, path, 10)
    assert torch.equal(grid_samples(path, 16, 5), rows[0])
    with pytest.raises(ValueError, match="too narrow"):
        grid_samples(path, 16, 6)


def test_bad_sweep_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "SWEEP_DIR" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
