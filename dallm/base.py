"""The base model: loading its parts, a pipeline from parts, the inference dtype rule, a VAE round trip.

One loader for training (`DallmModule.load_base`), class images (`DallmDataModule.prepare_data`) and
the `dallm teacher --backend diffusers` pipeline, so revision, variant and dtype mean the same in all
three. Loading is lazy in diffusers/transformers imports: `import dallm.base` stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def model_id(name: str) -> str:
    """How a model is recorded: a local directory resolved, so "./sd" and "/abs/sd" are the same model."""
    return str(Path(name).resolve()) if name and os.path.isdir(name) else name


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype rule for generation: fp16 on CUDA (half the memory, same images to the eye), else fp32."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_error(src: str, flag: str, err: Exception) -> ValueError:
    where = "local directory" if Path(src).exists() else "hub id (is HF_HUB_OFFLINE set, or is it cached?)"
    return ValueError(f"{flag}: cannot load the base model {src!r} as a {where}: {str(err).splitlines()[0]}")


def load_base_parts(
    src: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    scheduler: str | None = "DDPMScheduler",
    flag: str = "--model.pretrained_model_name_or_path",
) -> dict[str, Any]:
    """Tokenizer, noise scheduler, text encoder, VAE and UNet of a Stable-Diffusion-layout model.

    Args:
        src: hub id or local directory with tokenizer/, scheduler/, text_encoder/, vae/, unet/.
        revision: hub revision (branch, tag or commit).
        variant: weight-file variant, e.g. "fp16".
        dtype: dtype of the weights (text encoder, VAE, UNet).
        scheduler: scheduler class to read scheduler/ as (training uses DDPM's noise schedule); None for
            the class the model was saved with (what its own pipeline samples with).
        flag: the CLI flag that named `src`, for errors.

    Returns:
        {"tokenizer", "noise_scheduler", "text_encoder", "vae", "unet"}, the keyword arguments of
        `DallmModule.attach_base`; with "tokenizer_2" and "text_encoder_2" too for an SDXL model (detected
        from its own model_index.json, dallm.sdxl).

    Raises:
        ValueError: naming `flag`, when the model cannot be loaded.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from dallm import sdxl

    kw = {"revision": revision}
    # `dtype`, not `torch_dtype`: diffusers 0.42 and transformers 5 deprecate the latter (pyproject floors).
    weights = {"variant": variant, "dtype": dtype, **kw}
    try:
        config = diffusers.DDPMScheduler.load_config(src, subfolder="scheduler", **kw)
        scheduler_cls = getattr(diffusers, scheduler or config["_class_name"])
        parts = {
            "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
            "noise_scheduler": scheduler_cls.from_config(config),
            "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **weights),
            "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", **weights),
            "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", **weights),
        }
        if sdxl.is_sdxl_model(src, revision):
            parts.update(sdxl.load_sdxl_parts(src, kw, weights, parts["unet"]))
        return parts
    except (OSError, ValueError) as err:
        raise _load_error(src, flag, err) from err


def pipeline_from_parts(
    tokenizer, text_encoder, vae, unet, scheduler, tokenizer_2=None, text_encoder_2=None
) -> Any:
    """A StableDiffusionPipeline over the given parts (no copies), without safety checker or progress bar;
    a StableDiffusionXLPipeline (no watermark) when the second text encoder is given (SDXL)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}
    if text_encoder_2 is not None:
        xl = {"text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "add_watermarker": False}
        pipe = StableDiffusionXLPipeline(**parts, **xl)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SCHEDULERS = ("dpm++", "ddim", "model")


def make_scheduler(name: str, config):
    """The sampler `name` built from a scheduler config (None: keep the model's); the KID rounds and
    `dallm sample` build theirs here, so the same name samples the same way in both."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "model":
        return None
    raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {name!r}")


def load_base_pipeline(
    src: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    device: str | None = None,
    flag: str = "--model.pretrained_model_name_or_path",
) -> Any:
    """The base model as a StableDiffusion(XL)Pipeline on `device` (default: cuda if available), in the
    dtype rule's dtype, sampling with the scheduler it was saved with."""
    device = device or default_device()
    parts = load_base_parts(
        src, revision=revision, variant=variant, dtype=inference_dtype(device), scheduler=None, flag=flag
    )
    parts["scheduler"] = parts.pop("noise_scheduler")
    return pipeline_from_parts(**parts).to(device)


def load_text2image_pipeline(
    model: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    device: str | None = None,
    flag: str = "--model",
) -> Any:
    """Any diffusers text-to-image pipeline (a teacher may be SDXL or larger, not only the SD layout), in the
    dtype rule's dtype on `device` (default: cuda if available)."""
    from diffusers import AutoPipelineForText2Image

    device = device or default_device()
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(
            model, revision=revision, variant=variant, dtype=inference_dtype(device)
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {model}: cannot load a diffusers text-to-image pipeline: {err}") from err
    return pipe.to(device)


@torch.no_grad()
def vae_roundtrip(vae, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Encode and decode (N, 3, H, W) images in [0, 1] with `vae` (at its mode): what the UNet can at best
    reach. Returns fp32 reconstructions in [0, 1] on the CPU."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = (images[i : i + batch_size] * 2 - 1).to(vae.device, vae.dtype)
        latents = vae.encode(x).latent_dist.mode()
        out.append(((vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)
