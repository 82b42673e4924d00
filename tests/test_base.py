"""Tests of dallm.base: one loader of the base model for training, class images and pipelines."""

from __future__ import annotations

import pytest
import torch

from dallm.base import (
    inference_dtype,
    load_base_parts,
    load_base_pipeline,
    model_id,
    pipeline_from_parts,
    vae_roundtrip,
)


def test_parts_take_the_scheduler_asked_for_and_the_dtype(tiny_model_dir):
    parts = load_base_parts(str(tiny_model_dir), dtype=torch.bfloat16)
    assert type(parts["noise_scheduler"]).__name__ == "DDPMScheduler"  # training's noise schedule
    assert parts["unet"].dtype == parts["vae"].dtype == parts["text_encoder"].dtype == torch.bfloat16
    own = load_base_parts(str(tiny_model_dir), scheduler=None)
    assert type(own["noise_scheduler"]).__name__ == "DDIMScheduler"  # what the model was saved with
    assert own["unet"].dtype == torch.float32


def test_pipeline_shares_the_parts_and_samples_like_the_saved_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = load_base_pipeline(str(tiny_model_dir), device="cpu")
    saved = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    kw = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    b = saved(generator=torch.Generator().manual_seed(3), **kw).images
    assert a.shape == (1, 32, 32, 3) and abs(a - b).max() == 0
    again = pipeline_from_parts(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler)
    assert again.unet is pipe.unet and again.safety_checker is None


def test_load_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--data\.x: cannot load the base model .* as a local directory"):
        load_base_parts(str(tmp_path), flag="--data.x")
    assert inference_dtype("cpu") == torch.float32 and inference_dtype("cuda:1") == torch.float16
    assert model_id(str(tmp_path / ".." / tmp_path.name)) == str(tmp_path.resolve())
    assert model_id("org/model") == "org/model"


def test_vae_roundtrip_is_batched_and_in_unit_range(tiny_model_dir):
    vae = load_base_parts(str(tiny_model_dir))["vae"]
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole, batched = vae_roundtrip(vae, images, batch_size=8), vae_roundtrip(vae, images, batch_size=2)
    assert whole.shape == (5, 3, 32, 32) and whole.min() >= 0 and whole.max() <= 1
    assert torch.allclose(whole, batched, atol=1e-5)
