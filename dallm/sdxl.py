"""Stable Diffusion XL as the student: detection, its second text encoder, pooled embeddings, added time ids.

SDXL differs from SD v1-5 where dallm touches it in four places, all here:
- the model: `model_index.json` names a `text_encoder_2` (OpenCLIP bigG with projection) and the UNet's
  `addition_embed_type` is `"text_time"` (`is_sdxl_model`, `load_sdxl_parts`);
- the prompt: the penultimate hidden states of both encoders side by side, (N, 77, 768 + 1280), plus the
  second encoder's pooled projection (N, 1280), as `StableDiffusionXLPipeline.encode_prompt` does
  (`encode_prompts`); the empty prompt is zeros when the pipeline's `force_zeros_for_empty_prompt` says so,
  which is what classifier-free guidance extrapolates from at sampling;
- the added time ids (original height, width, crop top, left, target height, width) of each training
  image, from its real size and crop (`time_ids`; the dataset carries them, `dallm.data.dataset`);
- the pipeline that samples: `StableDiffusionXLPipeline` (`dallm.base.pipeline_from_parts` builds it).
"""

from __future__ import annotations

from typing import Any

import torch

# (original h, w) + (crop top, left) + (target h, w): SDXL's micro-conditioning, six numbers per image.
TIME_ID_FIELDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")


def is_sdxl_model(src: str, revision: str | None = None) -> bool:
    """Whether the diffusers model at `src` is SDXL-shaped: its `model_index.json` lists a `text_encoder_2`.

    A model without `model_index.json` (a bare UNet folder) is not a pipeline dallm can train, so it counts as
    not SDXL here and fails in the SD loader with that loader's message.
    """
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(src, revision=revision)
    except (OSError, ValueError):
        return False
    entry = index.get("text_encoder_2")
    return isinstance(entry, (list, tuple)) and entry[0] is not None


def load_sdxl_parts(src: str, kw: dict, weights: dict, unet) -> dict[str, Any]:
    """The second tokenizer and text encoder of the SDXL model at `src` (hub kwargs `kw`, weight kwargs `weights`).

    `unet` is checked to be SDXL's (added text-time embedding), so a mislabelled model fails here, naming why.
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    if unet.config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"model_index.json has a text_encoder_2 but the UNet's addition_embed_type is "
            f"{unet.config.get('addition_embed_type')!r}, not 'text_time' (SDXL's)"
        )
    return {
        "tokenizer_2": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **weights),
    }


def encode_prompts(
    tokenizers: list, text_encoders: list, prompts: list[str], zero_empty: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (hidden (N, L, D1 + D2), pooled (N, P)) exactly as `StableDiffusionXLPipeline.encode_prompt`.

    Each encoder's penultimate hidden states, concatenated on the feature axis; the pooled projection of the
    last (second) encoder. `zero_empty`: the empty prompt gives zeros for both, as the pipeline's
    `force_zeros_for_empty_prompt` makes its negative branch (so the held empty prompt is the one CFG uses).
    """
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)  # fmt: skip
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (N, P)
            pooled = out[0]
        hidden.append(out.hidden_states[-2])  # (N, L, D_k)
    states = torch.cat(hidden, dim=-1)  # (N, L, D1 + D2)
    if zero_empty:
        empty = torch.tensor([p == "" for p in prompts], device=states.device)
        states = torch.where(empty[:, None, None], torch.zeros_like(states), states)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return states, pooled


def time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's added time ids of one image: (6,) float, in TIME_ID_FIELDS order (all (height, width) / (top, left))."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def default_time_ids(n: int, height: int, width: int, device) -> torch.Tensor:
    """(N, 6) time ids of an uncropped `height` x `width` image: what the pipeline samples with by default."""
    return time_ids((height, width), (0, 0), (height, width)).to(device).expand(n, -1)


def unet_added_conditions(pooled: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs` for pooled embeddings (N, P) and time ids (N, 6)."""
    return {"text_embeds": pooled.to(dtype), "time_ids": ids.to(pooled.device, dtype)}
