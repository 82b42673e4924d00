"""Helpers shared by several test files: a short tiny-model `dallm fit` in-process, a checkpoint's trainable weights,
the comparison of two export dirs.

A plain module (tests/ is on sys.path under pytest's default rootdir-relative imports), so test files
import these instead of importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

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


def same_export(a: Path, b: Path, card: bool = True) -> None:
    """Two export dirs hold the same file names, tensors, metadata, dallm.json and (card) model card."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            x, y = load_file(a / name), load_file(b / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
            with safe_open(str(a / name), "pt") as f, safe_open(str(b / name), "pt") as g:
                assert f.metadata() == g.metadata(), name
    assert json.loads((a / "dallm.json").read_text()) == json.loads((b / "dallm.json").read_text())
    if card:
        assert (a / "README.md").read_text() == (b / "README.md").read_text()
