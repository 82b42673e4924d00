"""Tests of dallm.data.dataset: seeded preprocessing and the batch contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dallm.data.dataset import TeacherPriorDataset, collate, preprocess


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_preprocess_shape_range_and_determinism():
    image = _noise_image(48, 24)
    out = preprocess(image, 16, center_crop=False, random_flip=True, seed=3)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and out.min() < -0.5 and out.max() > 0.5
    assert torch.equal(out, preprocess(image, 16, center_crop=False, random_flip=True, seed=3))
    # Random crops of a 32x16 resize: different seeds land on different offsets.
    crops = {
        preprocess(image, 16, center_crop=False, random_flip=False, seed=s).sum().item() for s in range(8)
    }
    assert len(crops) > 2
    centre = [preprocess(image, 16, center_crop=True, random_flip=False, seed=s) for s in range(3)]
    assert all(torch.equal(centre[0], c) for c in centre)
    square = _noise_image(48, 16)  # short side already 16: no resize, so the crop is exact
    middle = torch.from_numpy(np.asarray(square)[:, 16:32].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(preprocess(square, 16, center_crop=True, random_flip=False, seed=0), middle)
    flips = [preprocess(image, 16, center_crop=True, random_flip=True, seed=s) for s in range(16)]
    assert any(torch.equal(f, centre[0].flip(-1)) for f in flips) and any(
        torch.equal(f, centre[0]) for f in flips
    )


def test_collate_validation_seeds():
    ds = TeacherPriorDataset([(Path("x.png"), "p")], resolution=8)
    ds._images[Path("x.png")] = Image.new("RGB", (8, 8), (255, 0, 0))
    ds._sizes[Path("x.png")] = (8, 8)  # the file's own size (SDXL time ids)
    ds._content_ids[Path("x.png")] = "x"  # no file behind it: the cache key's content id, given
    batch = collate([ds[3], ds[4]])
    assert batch["seeds"].tolist() == [3, 4]
    assert batch["pixel_values"][0, 0].eq(1).all() and batch["pixel_values"][0, 1].eq(-1).all()
