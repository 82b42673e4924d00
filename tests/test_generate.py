"""Tests of dallm.teacher.pipeline: one seed per image, whatever the batch."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dallm.teacher.pipeline import generate_with_pipeline


def test_generation_same_seed_same_image_any_batch_size(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    args = dict(num_inference_steps=2, guidance_scale=7.5, height=32, width=32, model="tiny", progress=False)
    a = generate_with_pipeline(pipe, "a red circle", tmp_path / "a", [5, 6, 7], 0, batch_size=3, **args)
    b = generate_with_pipeline(pipe, "a red circle", tmp_path / "b", [7], 2, batch_size=1, **args)
    assert [p.name for p in a] == ["000000.png", "000001.png", "000002.png"] and b[0].name == "000002.png"
    diff = np.abs(np.asarray(Image.open(a[2])).astype(int) - np.asarray(Image.open(b[0])).astype(int))
    assert diff.max() <= 1  # batched kernels may round differently; the noise is the same
    other = np.asarray(Image.open(a[0])).astype(int)
    assert np.abs(other - np.asarray(Image.open(b[0])).astype(int)).max() > 10
