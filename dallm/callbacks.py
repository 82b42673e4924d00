"""The Lightning hooks of a dallm run besides the KID round's: export, best checkpoint, early stop, progress, HParams.

The KID round and its callback are in `dallm.measure` (`round`, `callback`); `KIDCallback` is imported here
because the export, early stop and HParams hooks read its history.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

from dallm.ema import looked_at
from dallm.measure.callback import KIDCallback
from dallm.trainer import run_dir


class LoraExport(pl.Callback):
    """Export the LoRA + token embeddings at every checkpoint and at the end of training, in every format.

    Writes `<run dir>/lora/step=NNNNNN/` (diffusers files, the kohya file, the run's embedding, a model card;
    see `dallm.export.formats`), refreshes `<run dir>/lora/last/`, and refreshes `<run dir>/lora/best/` whenever the
    best-KID checkpoint (`checkpoints/best.ckpt`, a ModelCheckpoint monitoring kid/val) is saved. Global rank
    0 writes.
    """

    def __init__(self, enabled: bool = True, formats: list[str] = ["diffusers", "kohya"]) -> None:  # noqa: B006
        """
        Args:
            enabled: export at every checkpoint and at the end of fit.
            formats: export formats: diffusers (load_lora_weights + token files), kohya (for A1111, Forge,
                ComfyUI and kohya, beside the run's embedding file), a1111 (the embedding bundled inside).
        """
        from dallm.export.formats import check_formats

        self.enabled = enabled
        self.formats = check_formats(list(formats), "--export.formats")
        self._exported_step: int | None = None
        self._best_score: float | None = None
        self.run_info: dict = {}  # facts of the run for the kohya metadata and model card; saved in checkpoints

    def state_dict(self) -> dict:
        return {"run_info": self.run_info}

    def load_state_dict(self, state_dict: dict) -> None:
        self.run_info = dict(state_dict.get("run_info") or {})

    def on_train_start(self, trainer, pl_module) -> None:
        from dallm.export.formats import run_name

        dm = trainer.datamodule
        hp = getattr(dm, "hparams", {})
        lr = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        self.run_info = {
            "name": run_name(run_dir(trainer)),
            "num_train_images": len(getattr(dm, "train_teacher_paths", []) or []),
            "num_val_images": len(getattr(dm, "val_teacher_paths", []) or []),
            "num_reg_images": len(getattr(dm, "prior_paths", []) or []),
            "resolution": hp.get("resolution"),
            "learning_rate": lr.get("initial_lr", lr.get("lr")),
            "seed": pl_module.hparams.get("seed"),
            "max_steps": trainer.max_steps,
            "prior_loss_weight": pl_module.hparams.get("prior_loss_weight"),
            "noise_offset": pl_module.hparams.get("noise_offset"),
        }
        best = best_checkpoint_callback(trainer)
        # After a resume the restored best is already exported: only a new best is written.
        self._best_score = _score(best.best_model_score) if best is not None else None

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        from dallm.export.formats import copy_export, write_exports

        step = trainer.global_step
        if not self.enabled or self._exported_step == step:
            return None
        # trainer.log_dir is a collective under DDP: every rank asks (once), only rank 0 writes.
        run = run_dir(trainer)
        root = run / "lora"
        self._exported_step = step
        if not trainer.is_global_zero:
            return None
        kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
        formats = self.formats
        if pl_module.hparams.get("use_dora") and {"kohya", "a1111"} & set(formats):
            formats = [f for f in formats if f not in ("kohya", "a1111")] or ["diffusers"]
            if not getattr(self, "_dora_noted", False):
                rank_zero_info("dallm: DoRA has no exact kohya form; exporting the diffusers format only")
                self._dora_noted = True
        with looked_at(pl_module):  # the weight average, with --model.ema_decay
            out = write_exports(
                pl_module,
                root / f"step={step:06d}",
                step,
                formats,
                self.run_info,
                kid.history if kid is not None else [],
                run / "samples",
            )
        copy_export(out, root / "last")
        return out

    def export_best(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refresh lora/best when the best-KID checkpoint has just taken a new best (it is being saved now)."""
        from dallm.export.formats import copy_export

        best = best_checkpoint_callback(trainer)
        score = _score(best.best_model_score) if best is not None else None
        if not self.enabled or score is None or score == self._best_score:
            return
        self._best_score = score
        root = run_dir(trainer) / "lora"
        self.export(trainer, pl_module)  # this step's export, if not written yet
        if trainer.is_global_zero:
            copy_export(root / f"step={trainer.global_step:06d}", root / "best")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.export(trainer, pl_module)
        self.export_best(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        out = self.export(trainer, pl_module)
        if out is not None:
            rank_zero_info(f"dallm: LoRA exported to {out} and {out.parent / 'last'}")


def _score(value) -> float | None:
    return None if value is None else float(value)


def best_checkpoint(every_n_steps: int) -> ModelCheckpoint:
    """Lightning's ModelCheckpoint keeping `checkpoints/best.ckpt` at the lowest kid/val (ties: the earlier step).

    It looks at kid/val on the KID rounds' steps (`--kid.every_n_steps`; the round runs first and puts its
    numbers in `trainer.callback_metrics`); rounds off that grid (step 0, an odd final step) are not candidates.
    """
    return ModelCheckpoint(
        monitor="kid/val",
        mode="min",  # strict "<": an equal later KID keeps the earlier step
        save_top_k=1 if every_n_steps > 0 else 0,
        filename="best",
        auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps,
        enable_version_counter=False,
        # Decide at the round's own step: never defer to a validation end that may not come (the last batch).
        save_on_train_epoch_end=True,
    )


def best_checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The best-KID ModelCheckpoint among the trainer's callbacks, if any."""
    return next(
        (cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor == "kid/val"), None
    )


class KIDEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping on kid/val, checked right after each KID round: patience counts KID rounds.

    Not at validation ends (Lightning's default), where kid/val would be a stale value from an older round.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"--early_stopping.patience must be >= 1, got {patience}")
        super().__init__(monitor="kid/val", mode="min", patience=patience, check_on_train_epoch_end=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
        fresh = kid is not None and kid.history and kid.history[-1]["step"] == trainer.global_step
        if fresh and trainer.global_step > 0 and "kid/val" in kid.history[-1]:
            self._run_early_stopping_check(trainer)


class StepProgressBar(RichProgressBar):
    """Rich progress bar counting the run's optimizer steps (`step 120/250`): one epoch here is the whole run."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_steps(trainer)

    def _show_steps(self, trainer) -> None:
        if self.progress is None or self.train_progress_bar_id is None or trainer.max_steps <= 0:
            return
        step, total = trainer.global_step, trainer.max_steps
        self.progress.update(self.train_progress_bar_id, completed=step, total=total, description=f"step {step}/{total}")



class HParamsLog(pl.Callback):
    """A run's settings and KID summary in TensorBoard's HParams tab, to compare the runs of a sweep.

    Params: rank, alpha, num_teacher_images, lr (LoRA), token_lr, max_steps, seed, base, teacher.
    Metrics (scalars, refreshed after every KID round): `hp/kid_val_start` (step 0), `hp/kid_val_best`,
    `hp/kid_val_last`, `hp/kid_val_last_se` (when the KID callback logs `kid/val_se`), `hp/kid_prior_last`.
    """

    METRICS = (
        "hp/kid_val_start",
        "hp/kid_val_best",
        "hp/kid_val_last",
        "hp/kid_val_last_se",
        "hp/kid_prior_last",
    )

    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: write the HParams summary (needs the TensorBoard logger).
        """
        self.enabled = enabled
        self._rounds_seen = -1

    @staticmethod
    def params(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float | str]:
        """The settings a sweep compares, read from the module, data module, optimizer and seed."""
        import os

        hp, dm = pl_module.hparams, trainer.datamodule
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        lr = next((g["lr"] for g in groups if g.get("name") == "lora"), groups[0]["lr"] if groups else None)
        return {
            "rank": hp.rank,
            "alpha": hp.alpha if hp.alpha is not None else hp.rank,
            "num_teacher_images": len(dm.train_teacher_paths) if dm is not None else None,
            "lr": lr,
            "token_lr": hp.token_lr,
            "max_steps": trainer.max_steps,
            # Lightning records --seed_everything here; the module's own seed is the fallback.
            "seed": int(os.environ.get("PL_GLOBAL_SEED", hp.seed)),
            "base": str(hp.pretrained_model_name_or_path),
            "teacher": str(dm.hparams.teacher_dir) if dm is not None else None,
        }

    def on_fit_start(self, trainer, pl_module) -> None:
        # Before Lightning's own log_hyperparams (same hook order in Trainer._run): TensorBoard keeps the
        # first session summary of a run, and Lightning's holds neither these names nor the KID metrics.
        from lightning.pytorch.loggers import TensorBoardLogger
        from torch.utils.tensorboard.summary import hparams

        if not (self.enabled and trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger)):
            return
        params = {k: v for k, v in self.params(trainer, pl_module).items() if v is not None}
        writer = trainer.logger.experiment._get_file_writer()  # as Lightning's log_hyperparams does
        for summary in hparams(params, dict.fromkeys(self.METRICS, 0.0)):
            writer.add_summary(summary)

    def metrics(self, history: list[dict]) -> dict[str, float]:
        """The HParams metrics from the KID rounds so far."""
        rounds = [h for h in history if "kid/val" in h]
        if not rounds:
            return {}
        out = {
            "hp/kid_val_start": rounds[0]["kid/val"],
            "hp/kid_val_best": min(h["kid/val"] for h in rounds),
            "hp/kid_val_last": rounds[-1]["kid/val"],
        }
        if "kid/val_se" in rounds[-1]:
            out["hp/kid_val_last_se"] = rounds[-1]["kid/val_se"]
        prior = [h for h in history if "kid/prior" in h]
        if prior:
            out["hp/kid_prior_last"] = prior[-1]["kid/prior"]
        return out

    def _update(self, trainer) -> None:
        kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
        if not self.enabled or kid is None or len(kid.history) == self._rounds_seen or trainer.logger is None:
            return
        self._rounds_seen = len(kid.history)
        values = self.metrics(kid.history)
        if values and trainer.is_global_zero:
            trainer.logger.log_metrics(values, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._update(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._update(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._update(trainer)
