"""The KID callback in tiny training runs: tags, steps, sample grids, resume, reference values."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import fit

KID = ["--kid.every_n_steps", "2", "--kid.num_samples", "6", "--kid.num_inference_steps", "3"]


def scalars(run, tag):
    return [(e.step, e.value) for e in EventAccumulator(str(run)).Reload().Scalars(tag)]


@pytest.mark.slow
def test_kid_logged_at_zero_every_n_and_end(tmp_path):
    fit(tmp_path, *KID, steps=5, every=5)
    run = tmp_path / "logs/run/version_0"
    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "kid/train",
        "kid/train_std",
        "kid/val",
        "kid/val_std",
        "kid/prior",
        "kid/reference",
        "kid/val_floor",
    ):
        assert tag in tags, tag
    for tag in ("kid/train", "kid/val", "kid/prior"):
        assert [e.step for e in events.Scalars(tag)] == [0, 2, 4, 5], tag
    assert [e.step for e in events.Scalars("kid/reference")] == [0]
    assert events.Tags()["images"] == ["samples"]
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step=000000.png", "step=000002.png", "step=000004.png", "step=000005.png"]
    # The round history is in the checkpoint, so a resumed run knows which rounds happened.
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    history = next(v["history"] for k, v in ckpt["callbacks"].items() if k.startswith("KIDCallback"))
    assert [h["step"] for h in history] == [0, 2, 4, 5]


@pytest.mark.slow
def test_kid_history_continues_after_resume(tmp_path):
    fit(tmp_path, *KID, steps=4, every=4)
    fit(tmp_path, *KID, "--ckpt_path", "last", steps=6, every=4)
    run = tmp_path / "logs/run/version_0"
    # One curve: no second baseline at step 0, rounds 0, 2, 4 before and 6 after the resume.
    assert [s for s, _ in scalars(run, "kid/val")] == [0, 2, 4, 6]


def test_bad_feature_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path, "--kid.every_n_steps", "2", "--kid.feature", "nonsense")
    assert "dallm: error: --kid.feature 'nonsense'" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))
