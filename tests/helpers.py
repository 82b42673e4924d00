"""Helpers shared by several test files: a short tiny-model `dallm fit` in-process, a checkpoint's trainable weights.

A plain module (tests/ is on sys.path under pytest's default rootdir-relative imports), so test files
import these instead of importing each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dallm.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def fit(tmp: Path, *extra: str, steps: int = 4, every: int = 4, name: str = "run") -> None:
    main(
        [
            "fit",
            "--config",
            str(TINY),
            "--model.pretrained_model_name_or_path",
            str(ROOT / "assets/tiny/base"),
            "--data.teacher_dir",
            str(ROOT / "assets/tiny/teacher"),
            "--data.prior_dir",
            str(tmp / "prior"),
            "--data.num_prior_images",
            "4",
            "--data.batch_size",
            "2",
            "--trainer.logger.init_args.save_dir",
            str(tmp / "logs"),
            "--trainer.logger.init_args.name",
            name,
            "--trainer.max_steps",
            str(steps),
            "--trainer.val_check_interval",
            str(every),
            "--trainer.enable_progress_bar",
            "false",
            "--checkpoint.every_n_train_steps",
            str(every),
            "--kid.every_n_steps",
            "0",
            *extra,
        ]
    )


def trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
