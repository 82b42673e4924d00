"""The KID callback in tiny training runs: tags, steps, sample grids, resume, reference values."""

from __future__ import annotations

import pytest
import torch
from helpers import fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
        "kid/train_se",
        "kid/val",
        "kid/val_se",
        "kid/prior",
        "kid/prior_se",
        "kid/reference",
        "kid/val_floor",
    ):
        assert tag in tags, tag
    for tag in ("kid/train", "kid/val", "kid/prior", "kid/val_se"):
        assert [e.step for e in events.Scalars(tag)] == [0, 2, 4, 5], tag
    assert all(e.value > 0 for e in events.Scalars("kid/val_se"))
    assert [e.step for e in events.Scalars("kid/reference")] == [0]
    assert events.Tags()["images"] == ["samples"]
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step=000000.png", "step=000002.png", "step=000004.png", "step=000005.png"]
    # The round history is in the checkpoint, so a resumed run knows which rounds happened.
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    history = next(v["history"] for k, v in ckpt["callbacks"].items() if k.startswith("KIDCallback"))
    assert [h["step"] for h in history] == [0, 2, 4, 5]
    assert all(h["kid/val_se"] > 0 and h["kid/prior_se"] > 0 for h in history)


@pytest.mark.slow
def test_more_samples_than_teacher_images(tmp_path, capsys):
    # 12 generated samples against the tiny world's few held-out teacher images: allowed, with an SE.
    fit(tmp_path, "--kid.every_n_steps", "2", "--kid.num_samples", "12", "--kid.num_inference_steps", "2",
        steps=2, every=2)  # fmt: skip
    # The end-of-fit summary gives kid/val with its standard error at step 0 and at the end.
    summary = next(line for line in capsys.readouterr().out.splitlines() if "kid/val: step 0" in line)
    assert summary.count("±") >= 2, summary
    events = EventAccumulator(str(tmp_path / "logs/run/version_0")).Reload()
    assert [e.step for e in events.Scalars("kid/val_se")] == [0, 2]


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
