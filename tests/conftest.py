"""Shared pytest fixtures. Keep each fixture self-contained: several test modules rely on them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network; set before diffusers/transformers read it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable-Diffusion-layout model (32x32 images, DDIM) saved once per test session."""
    from dallm.arch.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("tiny_model")
    build_tiny_pipeline(out, seed=0, resolution=32)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP vision model with projection (32x32 input), saved once per test session."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=16,
    )
    out = tmp_path_factory.mktemp("tiny_clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(out)
    return out
