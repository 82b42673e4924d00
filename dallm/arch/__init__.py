"""Model architectures with random weights, for benchmarks: throughput and memory do not depend on values.

`sd15` is Stable Diffusion v1-5's UNet / VAE / CLIP ViT-L/14 text encoder, from the JSON configs beside
this file (copied from the model's published config files), so no download is needed. Its tokenizer is
the tiny CLIP BPE: token ids stay within the 49,408-row table and the sequence length is 77, as in SD.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _config(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def build_components(
    arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"
) -> dict:
    """Tokenizer, noise scheduler, text encoder, VAE and UNet of `arch` ("sd15" or "tiny"), random weights.

    The dict's keys are `DallmModule.attach_base`'s arguments. Built directly on `device` (an SD UNet
    initialises in seconds on a GPU, ~15 s on 2 CPU cores).
    """
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    if arch == "sd15":
        with torch.device(device):
            parts = _sd15()
        scheduler = DDPMScheduler.from_config(_config("sd15_scheduler"))
    elif arch == "tiny":
        from dallm.tiny import build_tiny_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            pipe = build_tiny_pipeline(tmp, seed=seed)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        parts = {
            "tokenizer": pipe.tokenizer,
            "text_encoder": pipe.text_encoder,
            "vae": pipe.vae,
            "unet": pipe.unet,
        }
    else:
        raise ValueError(f"--arch must be tiny or sd15, got {arch!r}")
    for name in ("text_encoder", "vae", "unet"):
        # No cast when already fp32: diffusers warns on every .to(dtype).
        parts[name] = parts[name].to(device) if dtype == torch.float32 else parts[name].to(device, dtype)
    return {"noise_scheduler": scheduler, **parts}


def _sd15() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dallm.tiny import write_clip_bpe_files

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_bpe_files(Path(tmp))
        tokenizer = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77)
    text = {k: v for k, v in _config("sd15_text_encoder").items() if k not in ("architectures", "model_type")}
    return {
        "tokenizer": tokenizer,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text)),
        "vae": AutoencoderKL.from_config(_config("sd15_vae")),
        "unet": UNet2DConditionModel.from_config(_config("sd15_unet")),
    }
