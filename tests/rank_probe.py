"""A callback for the DDP test: each rank writes its final trainable weights and the prompts it saw."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from safetensors.torch import save_file


class SaveRankWeights(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the first pixel of every instance image identifies it
        pixels = batch["pixel_values"][~batch["is_prior"]]
        self.seen += [f"{v:.4f}" for v in pixels[:, 0, 0, 0].tolist()]

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.trainable_state_dict().items()}
        save_file(state, str(self.out_dir / f"rank{rank}.safetensors"))
        (self.out_dir / f"rank{rank}.txt").write_text("\n".join(self.seen))
