"""The best checkpoint by KID (Lightning's ModelCheckpoint on kid/val), lora/best, early stopping on KID rounds,
`dallm export` of a training checkpoint and `dallm sample` of a run dir, in tiny training runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fit, same_export
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dallm.callbacks import StepProgressBar
from dallm.cli import main
from dallm.measure.callback import KIDCallback

KID = ["--kid.num_samples", "6", "--kid.num_inference_steps", "3"]
pytestmark = pytest.mark.slow


def kid_val(run: Path) -> dict[int, float]:
    return {e.step: e.value for e in EventAccumulator(str(run)).Reload().Scalars("kid/val")}


def argmin_step(values: dict[int, float], steps) -> int:
    return min(steps, key=lambda s: (values[s], s))  # ties: the earlier step




def script_kid_val(monkeypatch, values: list[float]) -> None:
    """KID round r reports kid/val = values[r] (the rest is measured): a curve whose best is known."""
    original = KIDCallback.kid
    scripted: set[int] = set()

    def kid(self, real, fake):
        result = original(self, real, fake)
        # the round's first KID against the held-out teachers is kid/val (then come the references)
        if real is self._reference.get("val") and len(self.history) not in scripted:
            scripted.add(len(self.history))
            return dataclasses.replace(result, kid_mean=values[len(self.history)])
        return result

    monkeypatch.setattr(KIDCallback, "kid", kid)


def test_best_follows_kid_and_survives_resume_export_and_sample(tmp_path, capsys, monkeypatch):
    # rounds at steps 0..10: the best trained step is 4 (6 ties it: the earlier stays), then 10 after resume
    script_kid_val(monkeypatch, [0.5, 0.4, 0.2, 0.2, 0.3, 0.1])
    fit(tmp_path, "--kid.every_n_steps", "2", *KID, steps=6, every=3)
    run = tmp_path / "logs/run/version_0"
    values = kid_val(run)
    assert sorted(values) == [0, 2, 4, 6]
    assert argmin_step(values, [2, 4, 6]) == 4
    info = json.loads((run / "lora/best/dallm.json").read_text())
    assert info["step"] == 4 and info["kid/val"] == pytest.approx(0.2)
    ckpt = torch.load(run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    same_export(run / "lora/best", run / "lora/step=000004", card=False)
    summary = capsys.readouterr().out
    assert "best: step 4 0.2" in summary
    assert "trigger word: run-v0" in summary  # the end-of-run summary names the one trigger word
    # every export holds every format and a model card
    assert {"pytorch_lora_weights.safetensors", "run-v0.safetensors", "run-v0-lora.safetensors", "README.md",
            "kid_curve.png"} <= {p.name for p in (run / "lora/step=000003").iterdir()}  # fmt: skip

    # `dallm export` of an old checkpoint equals the export written at that step during training
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run / "checkpoints/step=000003.ckpt"), "--out", str(tmp_path / "again")])
    assert exit_info.value.code == 0
    same_export(tmp_path / "again", run / "lora/step=000003", card=False)

    # `dallm sample` of a run dir looks at its best step
    with pytest.raises(SystemExit):
        main(["sample", "--lora", str(run), "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "s")])
    assert json.loads((tmp_path / "s/samples.json").read_text())["step"] == 4

    # resume keeps the best (step 8's 0.3 does not replace it) until a lower round comes (step 10)
    fit(tmp_path, "--kid.every_n_steps", "2", *KID, "--ckpt_path", "last", steps=10, every=3)
    assert sorted(kid_val(run)) == [0, 2, 4, 6, 8, 10]
    assert json.loads((run / "lora/best/dallm.json").read_text())["step"] == 10
    assert (
        torch.load(run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)["global_step"] == 10
    )


def test_early_stopping_counts_kid_rounds(tmp_path, monkeypatch):
    # patience 2: rounds at steps 3 and 4 do not beat step 2's 0.3, so the run stops at step 4 of 12
    script_kid_val(monkeypatch, [0.5, 0.4, 0.3, 0.35, 0.36] + [0.1] * 10)
    fit(tmp_path, "--kid.every_n_steps", "1", *KID, "--early_stopping.patience", "2", steps=12, every=12)
    run = tmp_path / "logs/run/version_0"
    assert sorted(kid_val(run)) == [0, 1, 2, 3, 4]
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4


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


def test_toy_run_best_is_the_argmin_of_kid_and_sample_uses_it(tmp_path):
    root = Path(__file__).resolve().parents[1]
    main(
        [
            "fit", "--config", str(root / "configs/toy.yaml"),
            "--model.pretrained_model_name_or_path", str(root / "dallm/toy/assets/base"),
            "--data.teacher_dir", str(root / "dallm/toy/assets/teacher"),
            "--data.prior_dir", str(tmp_path / "prior"), "--data.num_prior_images", "20",
            "--trainer.max_steps", "150", "--kid.every_n_steps", "25", "--trainer.val_check_interval", "150",
            "--checkpoint.every_n_train_steps", "150", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    run = tmp_path / "logs/toy/version_0"
    values = kid_val(run)
    assert sorted(values) == list(range(0, 151, 25))
    best = argmin_step(values, range(25, 151, 25))
    assert json.loads((run / "lora/best/dallm.json").read_text())["step"] == best
    with pytest.raises(SystemExit):
        main(["sample", "--lora", str(run), "--seeds", "0-1", "--steps", "4", "--out", str(tmp_path / "s")])
    assert json.loads((tmp_path / "s/samples.json").read_text())["step"] == best


def test_dora_and_noise_offset_train_and_their_export_loads_in_diffusers(tmp_path):
    from test_export import PROMPT, image, pipeline

    from dallm.export.sample import make_scheduler

    cli = main(
        ["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs/tiny.yaml"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--data.prior_dir", str(tmp_path / "prior"),
         "--data.num_prior_images", "2", "--data.batch_size", "2", "--trainer.max_steps", "3",
         "--kid.every_n_steps", "0", "--checkpoint.every_n_train_steps", "3", "--trainer.val_check_interval", "3",
         "--trainer.enable_progress_bar", "false", "--model.use_dora", "true", "--model.noise_offset", "0.1"]
    )  # fmt: skip
    module = cli.model
    magnitude = [p for n, p in module.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitude and module.hparams.noise_offset == 0.1
    out = tmp_path / "logs/tiny/version_0/lora/last"
    assert not list(out.glob("tiny-v0-lora.safetensors"))  # no kohya file for DoRA, and no crash
    assert (out / "tiny-v0.safetensors").is_file()  # the run's embedding is there
    sched = make_scheduler("ddim", module.noise_scheduler.config)
    ours = module.generate(PROMPT, [7], num_inference_steps=4, scheduler=sched, output_type="np")[0]
    pipe = pipeline(Path(module.hparams.pretrained_model_name_or_path).resolve())
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    base = image(pipe)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion([str(out / "s1.safetensors"), str(out / "s2.safetensors")])
    theirs = image(pipe)
    assert np.abs(theirs - ours).max() < 1e-4 and np.abs(theirs - base).max() > 0
