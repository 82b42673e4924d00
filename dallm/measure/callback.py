"""The KID callback: Lightning's hooks around a KID round (`dallm.measure.round`), its log and its history."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from dallm.ema import looked_at
from dallm.measure.round import KIDRound, format_metrics, own_rng
from dallm.trainer import run_dir


class KIDCallback(KIDRound, pl.Callback):
    """Kernel Inception Distance of the model's samples to the teacher images while it trains.

    At step 0 (the base model), every `every_n_steps` and at the end, it samples `num_samples` images
    with fixed seeds for the instance prompt and logs `kid/train` (against the teacher images trained
    on), `kid/val` (against held-out teacher images), `kid/prior` (class-prompt samples against the base
    model's class images, i.e. forgetting), each with its standard error (`kid/val_se`, ...: over draws of
    the two samples, not over the choice of sampling seeds) and, with CLIP features, `cmmd/*`. Once, at
    the first round, it also logs two references: `kid/reference` (train vs held-out teacher images: what
    "no difference" looks like at this sample size) and `kid/val_floor` (held-out teacher images vs their
    own VAE reconstructions: the best any fine-tuning of this UNet can reach).
    Teacher features are computed once; a grid of the samples goes to TensorBoard (`samples`) and to
    `<run dir>/samples/step=NNNNNN.png`. Under DDP every rank samples its share of the seeds.
    """

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    # ---------------------------------------------------------------- state across resume
    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def done_steps(self) -> set[int]:
        return {h["step"] for h in self.history}

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        from dallm.measure.kid import build_feature_extractor

        # Build now so a bad --kid.feature or missing weights fails before any training; a feature net that
        # initialises randomly draws from a forked generator, not the run's.
        try:
            with own_rng():
                self._extractor = build_feature_extractor(self.feature, weights=self.weights, device="cpu")
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"--kid.feature {self.feature!r}: {err}") from err

    def due(self, trainer, step: int) -> bool:
        """Whether `step` is a scheduled round: 0, every `every_n_steps`, and the last step."""
        return step % self.every_n_steps == 0 or step >= trainer.max_steps > 0

    def on_train_start(self, trainer, pl_module) -> None:
        # The base model's round at step 0; a run resumed at a step that is not scheduled gets no extra
        # round (its curve must equal the uninterrupted run's), one resumed at a scheduled step that was
        # not scored yet gets it.
        step = trainer.global_step
        if self.enabled and self.due(trainer, step) and step not in self.done_steps():
            self.run_round(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        step = trainer.global_step
        # The final round runs here too, before ModelCheckpoint's save of the same step, so that
        # last.ckpt holds it and a resumed run does not repeat it.
        if self.due(trainer, step) and step not in self.done_steps():
            self.run_round(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and trainer.global_step not in self.done_steps():
            self.run_round(trainer, pl_module)

    def run_round(self, trainer, pl_module) -> None:
        """One KID round on forked generators: scoring never changes what is trained."""
        step = trainer.global_step
        bad = pl_module.nonfinite_parameters() if hasattr(pl_module, "nonfinite_parameters") else []
        if bad:
            # Samples of a diverged model are noise or black; a KID of them would look plausible.
            rank_zero_info(f"dallm: step {step}: no KID round: {len(bad)} trainable tensors are non-finite")
            return
        with own_rng(pl_module.device), looked_at(pl_module):  # the weight average, with --model.ema_decay
            self._run_round(trainer, pl_module, step)

    def _run_round(self, trainer, pl_module, step: int) -> None:
        metrics, notes, grid_rows = self.score(trainer, pl_module)
        self.history.append({"step": step, **metrics})
        # This step's numbers, for the best-KID ModelCheckpoint and EarlyStopping (every rank: they all decide).
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})

        out_dir = run_dir(trainer) / "samples"  # a collective under DDP: all ranks ask
        if trainer.is_global_zero:
            self.write_grid(trainer, grid_rows, out_dir / f"step={step:06d}.png", step)
            if trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=step)
            rank_zero_info(f"dallm: step {step}: {format_metrics(metrics)}")
            for note in sorted(notes - self._noted):  # each note once per run, not every round
                rank_zero_info(f"  note: {note}")
            self._noted |= notes

    def write_grid(self, trainer, rows: list[torch.Tensor], path: Path, step: int) -> None:
        from torchvision.utils import make_grid, save_image

        per_row = rows[0].shape[0]
        grid = make_grid(torch.cat(rows), nrow=per_row, padding=1)  # one row per prompt
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, step)

