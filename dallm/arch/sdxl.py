"""SDXL-architecture models with random weights: a tiny one for the tests, the published one for benchmarks.

`build_tiny_sdxl` has every part SDXL has (VAE, CLIP text encoder, CLIP text encoder with projection, two
BPE tokenizers, UNet with the added text-time embedding and cross-attention over both encoders' states)
at toy size, saved in the diffusers layout, so it loads through the same `from_pretrained(dir)` path as
SDXL 1.0 base. `save_random_sdxl` writes the published architecture (the JSON configs beside this file,
copied from stabilityai/stable-diffusion-xl-base-1.0's config files) with random weights and tokenizers
that keep the paper's prompt words whole, as `dallm.arch.save_random_base("sd15", ...)` does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from dallm.manifest import save_pretrained

HERE = Path(__file__).parent


def _config(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def _tiny_tokenizers():
    """Two tiny CLIP BPE tokenizers (dallm.arch.tiny's words); the second pads with "!" as SDXL's tokenizer_2 does."""
    from transformers import CLIPTokenizer

    from dallm.arch.tiny import write_clip_bpe_files

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_bpe_files(Path(tmp))
        files = (f"{tmp}/vocab.json", f"{tmp}/merges.txt")
        return CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, model_max_length=77, pad_token="!")


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0, resolution: int = 32):
    """Build a tiny SDXL pipeline with random weights, save it to `out_dir` (diffusers layout), return it.

    Encoders of width 32 and 32 (projection 32): cross-attention over 64 features, the added embedding over
    6 time ids x 8 + 32 pooled = 80, as SDXL's 6 x 256 + 1280 = 2816. The UNet keeps SDXL's block layout
    (a first level without attention, layers_per_block 2, 1 then 2 transformer layers) at toy width, so the
    kohya block numbering is exercised as for the real model.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dallm.base import pipeline_from_parts

    tokenizer, tokenizer_2 = _tiny_tokenizers()
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**common, pad_token_id=tokenizer_2.pad_token_id, projection_dim=32)
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=resolution, scaling_factor=0.13025,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )  # fmt: skip
    pipe = pipeline_from_parts(tokenizer, text_encoder, vae, unet, scheduler, tokenizer_2, text_encoder_2)
    save_pretrained(pipe, out_dir)
    return pipe


def build_sdxl_components(dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> dict:
    """SDXL 1.0 base's parts with random weights (the published configs beside this file), in `dtype` on `device`.

    Keys are `DallmModule.attach_base`'s arguments (noise scheduler: DDPM with SDXL's schedule). The UNet
    (2.6 B) and VAE are filled by `dallm.arch.random_init_`; the text encoders (123 M, 695 M) by their own init.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dallm.arch import _config as sd15_config
    from dallm.arch import _diffusers_model, sd15_tokenizer

    def text(name: str, config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ("architectures", "model_type")}

    torch.manual_seed(seed)
    tokenizer_2 = sd15_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's tokenizer_2 pads with "!" (id 0), its first one with <|endoftext|>
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text("te", sd15_config("sd15_text_encoder")))).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text("te2", _config("sdxl_text_encoder_2"))))
        text_encoder_2 = text_encoder_2.to(dtype)
    return {
        "tokenizer": sd15_tokenizer(),
        "noise_scheduler": DDPMScheduler.from_config(_config("sdxl_scheduler")),
        "text_encoder": text_encoder,
        "vae": _diffusers_model(AutoencoderKL, _config("sdxl_vae"), device, dtype, seed + 1),
        "unet": _diffusers_model(UNet2DConditionModel, _config("sdxl_unet"), device, dtype, seed + 2),
        "tokenizer_2": tokenizer_2,
        "text_encoder_2": text_encoder_2,
    }


def save_random_sdxl(out_dir: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a random-weight SDXL 1.0 base to `out_dir` in its diffusers layout (model_index.json with
    text_encoder_2/tokenizer_2, EulerDiscreteScheduler, safetensors in `dtype`); return it."""
    from diffusers import EulerDiscreteScheduler

    from dallm.arch import write_sd15_tokenizer
    from dallm.base import pipeline_from_parts

    parts = build_sdxl_components(dtype, seed)
    scheduler = EulerDiscreteScheduler.from_config(_config("sdxl_scheduler"))
    pipe = pipeline_from_parts(
        parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"], scheduler,
        parts["tokenizer_2"], parts["text_encoder_2"],
    )  # fmt: skip
    out_dir = Path(out_dir)
    save_pretrained(pipe, out_dir)
    for folder in ("tokenizer", "tokenizer_2"):  # the published folders hold vocab.json + merges.txt
        write_sd15_tokenizer(out_dir / folder)
    return out_dir


def save_random_arch(arch: str, out_dir: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """`dallm.arch.save_random_base` with the SDXL architectures too: "sdxl" (published) and "tiny-sdxl"."""
    from dallm.arch import save_random_base

    if arch == "sdxl":
        return save_random_sdxl(out_dir, dtype, seed)
    if arch == "tiny-sdxl":
        save_pretrained(build_tiny_sdxl(out_dir, seed=seed).to(dtype=dtype), out_dir)
        return Path(out_dir)
    return save_random_base(arch, out_dir, dtype, seed)


def build_arch_components(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> dict:
    """`dallm.arch.build_components` with "sdxl" too (its second tokenizer and text encoder included)."""
    from dallm.arch import build_components

    return build_sdxl_components(dtype, seed, device) if arch == "sdxl" else build_components(arch, dtype, seed, device)
