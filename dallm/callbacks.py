"""Lightning callbacks of dallm."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


def run_dir(trainer: pl.Trainer) -> Path:
    """The run directory: the logger's version dir (lightning_logs/<name>/version_k), else default_root_dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class LoraExport(pl.Callback):
    """Export the LoRA + token embeddings for diffusers at every checkpoint and at the end of training.

    Writes `<run dir>/lora/step=NNNNNN/` and refreshes `<run dir>/lora/last/`, on global rank 0 only.
    """

    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: export at every checkpoint and at the end of fit.
        """
        self.enabled = enabled
        self._exported_step: int | None = None

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        step = trainer.global_step
        if not self.enabled or self._exported_step == step:
            return None
        # trainer.log_dir is a collective under DDP: every rank asks, only rank 0 writes.
        root = run_dir(trainer) / "lora"
        self._exported_step = step
        if not trainer.is_global_zero:
            return None
        out = pl_module.export(root / f"step={step:06d}")
        # Write the copy beside, then swap, so lora/last is never half-written.
        tmp = root / ".last.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        shutil.rmtree(root / "last", ignore_errors=True)
        tmp.rename(root / "last")
        return out

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        out = self.export(trainer, pl_module)
        if out is not None:
            rank_zero_info(f"dallm: LoRA exported to {out} and {out.parent / 'last'}")
