"""Lightning's Trainer with the valid range of each numeric flag in its type (`dallm.ranges`).

The arguments are Lightning's own, passed through unchanged; only their types are narrowed, so
`--trainer.accumulate_grad_batches 0` or `--trainer.limit_train_batches 0.5` is refused while parsing,
naming the flag, instead of running a run that means something else. Everything not listed here is
Lightning's signature as it is (`**kwargs`, which jsonargparse follows into `Trainer.__init__`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

from dallm.ranges import Count, FractionOfRun, NonNegativeFinite, NonNegativeInt, UnitInterval


class DallmTrainer(Trainer):
    """Lightning's Trainer; dallm narrows the ranges of its numeric arguments."""

    def __init__(
        self,
        *,
        devices: list[NonNegativeInt] | Count | Literal[-1, "auto"] = "auto",
        num_nodes: Count = 1,
        fast_dev_run: bool | NonNegativeInt = False,
        max_epochs: Count | None = None,
        min_epochs: NonNegativeInt | None = None,
        max_steps: Count = 1000,
        min_steps: NonNegativeInt | None = None,
        limit_train_batches: Literal[1, 1.0] | None = None,
        limit_val_batches: NonNegativeInt | UnitInterval | None = None,
        limit_test_batches: NonNegativeInt | UnitInterval | None = None,
        limit_predict_batches: NonNegativeInt | UnitInterval | None = None,
        overfit_batches: Literal[0, 0.0] = 0.0,
        val_check_interval: Count | FractionOfRun | None = None,
        check_val_every_n_epoch: Count | None = 1,
        num_sanity_val_steps: NonNegativeInt | Literal[-1] | None = None,
        log_every_n_steps: Count | None = None,
        accumulate_grad_batches: Count = 1,
        gradient_clip_val: NonNegativeFinite | None = None,
        reload_dataloaders_every_n_epochs: NonNegativeInt = 0,
        **kwargs,
    ) -> None:
        """
        Args:
            devices: devices per node: a count (>= 1), a list of device indices, -1 for all, or "auto".
            num_nodes: number of machines (>= 1).
            fast_dev_run: run this many batches (true: 1) of training and validation as a smoke test; 0/false: off.
            max_epochs: stop after this many epochs (>= 1); dallm runs count steps (--trainer.max_steps), one
                epoch is the whole run, so leave it unset.
            min_epochs: train at least this many epochs (>= 0).
            max_steps: optimizer steps of the run (>= 1).
            min_steps: train at least this many steps (>= 0).
            limit_train_batches: unset (or 1.0): dallm's training stream is --trainer.max_steps long; a smaller
                limit would end the run early and restart the stream, so it is refused.
            limit_val_batches: validation batches per check: a count (0: no validation) or a fraction in [0, 1].
            limit_test_batches: as limit_val_batches, for `test` (dallm has none).
            limit_predict_batches: as limit_val_batches, for `predict` (dallm has none).
            overfit_batches: 0 only: Lightning's overfitting mode replaces dallm's step-indexed stream.
            val_check_interval: validate every this many steps (>= 1), or a fraction (0, 1] of the run.
            check_val_every_n_epoch: validate every this many epochs (>= 1), or unset to validate by steps.
            num_sanity_val_steps: validation batches before training (>= 0), -1 for all.
            log_every_n_steps: log training metrics every this many steps (>= 1).
            accumulate_grad_batches: batches per optimizer step (>= 1).
            gradient_clip_val: clip gradients at this value (>= 0, finite); 0 or unset: no clipping.
            reload_dataloaders_every_n_epochs: reload the data loaders every this many epochs; 0: never.
        """
        super().__init__(
            devices=devices,
            num_nodes=num_nodes,
            fast_dev_run=fast_dev_run,
            max_epochs=max_epochs,
            min_epochs=min_epochs,
            max_steps=max_steps,
            min_steps=min_steps,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            overfit_batches=overfit_batches,
            val_check_interval=val_check_interval,
            check_val_every_n_epoch=check_val_every_n_epoch,
            num_sanity_val_steps=num_sanity_val_steps,
            log_every_n_steps=log_every_n_steps,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            reload_dataloaders_every_n_epochs=reload_dataloaders_every_n_epochs,
            **kwargs,
        )

    @property
    def received_sigterm(self) -> bool:
        """Whether a SIGTERM arrived; while fit validates, not yet: acted on at the end of the step.

        Lightning stops a validation pass in its middle on SIGTERM; inside fit that would leave the step's
        validation and metrics unwritten and no exact point to save. Deferred to the end of the step (a
        validation pass takes seconds), `dallm.resume.SigtermCheckpoint` saves a checkpoint that resumes
        exactly and loses no point of the curves.
        """
        if self.state.fn == TrainerFn.FITTING and self.validating:
            return False
        return super().received_sigterm


def run_dir(trainer: Trainer) -> Path:
    """The run directory: the logger's version dir (lightning_logs/<name>/version_k), else default_root_dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)
