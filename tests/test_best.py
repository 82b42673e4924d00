"""The best checkpoint by KID (Lightning's ModelCheckpoint on kid/val), lora/best, early stopping on KID rounds,
`dallm export` of a training checkpoint and `dallm sample` of a run dir, in tiny training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import fit

from dallm.callbacks import StepProgressBar
from dallm.cli import main

KID = ["--kid.num_samples", "6", "--kid.num_inference_steps", "3"]
pytestmark = pytest.mark.slow


def kid_val(run: Path) -> dict[int, float]:
    return {e.step: e.value for e in EventAccumulator(str(run)).Reload().Scalars("kid/val")}


def argmin_step(values: dict[int, float], steps) -> int:
    return min(steps, key=lambda s: (values[s], s))  # ties: the earlier step


def same_export(a: Path, b: Path) -> None:
    """Two export dirs hold the same files, tensors, metadata and dallm.json."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            x, y = load_file(a / name), load_file(b / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
            with safe_open(str(a / name), "pt") as f, safe_open(str(b / name), "pt") as g:
                assert f.metadata() == g.metadata(), name
    assert json.loads((a / "dallm.json").read_text()) == json.loads((b / "dallm.json").read_text())


def test_best_follows_kid_and_survives_resume_export_and_sample(tmp_path, capsys):
    fit(tmp_path, "--kid.every_n_steps", "2", *KID, steps=6, every=3)
    run = tmp_path / "logs/run/version_0"
    values = kid_val(run)
    assert sorted(values) == [0, 2, 4, 6]
    best = argmin_step(values, [2, 4, 6])  # step 0 is the base model, never a checkpoint
    info = json.loads((run / "lora/best/dallm.json").read_text())
    assert info["step"] == best and info["kid/val"] == pytest.approx(values[best], rel=1e-6)
    ckpt = torch.load(run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == best
    same_export(run / "lora/best", run / f"lora/step={best:06d}")
    assert f"best: step {best}" in capsys.readouterr().out
    # every export holds every format and a model card
    assert {"pytorch_lora_weights.safetensors", "run-v0.safetensors", "README.md", "kid_curve.png"} <= {
        p.name for p in (run / "lora/step=000003").iterdir()
    }

    # `dallm export` of an old checkpoint equals the export written at that step during training
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run / "checkpoints/step=000003.ckpt"), "--out", str(tmp_path / "again")])
    assert exit_info.value.code == 0
    same_export(tmp_path / "again", run / "lora/step=000003")

    # `dallm sample` of a run dir looks at its best step
    with pytest.raises(SystemExit):
        main(["sample", "--lora", str(run), "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "s")])
    assert json.loads((tmp_path / "s/samples.json").read_text())["step"] == best

    # resume keeps the best: a later round only replaces it when lower
    fit(tmp_path, "--kid.every_n_steps", "2", *KID, "--ckpt_path", "last", steps=10, every=3)
    values = kid_val(run)
    assert sorted(values) == [0, 2, 4, 6, 8, 10]
    best = argmin_step(values, [2, 4, 6, 8, 10])
    assert json.loads((run / "lora/best/dallm.json").read_text())["step"] == best
    assert torch.load(run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)["global_step"] == best


def test_early_stopping_counts_kid_rounds(tmp_path):
    fit(tmp_path, "--kid.every_n_steps", "1", *KID, "--early_stopping.patience", "1", steps=12, every=12)
    run = tmp_path / "logs/run/version_0"
    values = kid_val(run)
    # patience 1: stop at the first round (after step 1) that is not lower than every earlier one
    expected = next((s for s in range(2, 13) if values[s] >= min(values[t] for t in range(1, s))), 12)
    assert max(values) == expected
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == expected


def test_progress_bar_counts_steps(tmp_path):
    cli = main(
        ["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs/tiny.yaml"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--data.prior_dir", str(tmp_path / "prior"),
         "--data.num_prior_images", "2", "--data.batch_size", "2", "--trainer.max_steps", "3",
         "--kid.every_n_steps", "0", "--checkpoint.every_n_train_steps", "3", "--trainer.val_check_interval", "3"]
    )  # fmt: skip
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert task.description == "step 3/3" and task.total == 3 and task.completed == 3
