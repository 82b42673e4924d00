"""LoRA helpers: configs, target checks, parameter counts, and export in diffusers' format."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from torch import nn

from dallm.manifest import save_bytes_atomic

DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def matching_modules(model: nn.Module, target: str) -> list[str]:
    """Names of modules that peft's list-style `target_modules` entry `target` selects (suffix match)."""
    return [name for name, _ in model.named_modules() if name == target or name.endswith("." + target)]


def check_target_modules(model: nn.Module, targets: list[str], flag: str) -> None:
    """Fail early, naming the flag and showing real module names, when a target matches nothing."""
    if not targets:
        raise ValueError(f"{flag} is empty: LoRA needs at least one target module")
    for target in targets:
        if not matching_modules(model, target):
            suffixes = sorted(
                {
                    ".".join(name.split(".")[-2:])
                    for name, m in model.named_modules()
                    if isinstance(m, nn.Linear)
                }
            )
            raise ValueError(
                f"{flag}: {target!r} matches no module of the {type(model).__name__}; "
                f"linear layers there end in e.g. {suffixes[:8]}"
            )


def lora_config(
    rank: int, alpha: float | None, dropout: float, targets: list[str], use_dora: bool = False
) -> LoraConfig:
    """peft LoRA config; `alpha` defaults to `rank` (scale 1), gaussian init of A and zero B as in diffusers.

    `use_dora`: weight-decomposed LoRA (DoRA, Liu et al. 2024), peft's implementation.
    """
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
        use_dora=use_dora,
    )


def add_lora(model: nn.Module, config: LoraConfig) -> None:
    """Inject LoRA layers into `model` in place (adapter "default") with peft.

    peft's own injection, not the `add_adapter` of diffusers/transformers, so the UNet and the CLIP text
    encoder take the same path whatever version gates those wrappers carry; `peft_config` is set the way
    they set it, for `get_peft_model_state_dict`.
    """
    inject_adapter_in_model(config, model, adapter_name="default")
    model.peft_config = {"default": config}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of `model` (peft naming), detached on the CPU in fp32."""
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def diffusers_lora_bytes(unet: nn.Module, text_encoder: nn.Module | None) -> bytes:
    """The bytes of `pytorch_lora_weights.safetensors` exactly as diffusers' `save_lora_weights` writes them.

    The peft adapter configs go into the file's metadata, so rank and alpha survive the trip. Written into
    a scratch directory and read back, so that the file itself is placed by `save_bytes_atomic` (atomic,
    mode from the umask) instead of safetensors' 0600 `save_file`.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    kwargs = {}
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(peft_state_dict(text_encoder))
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=tmp,
            unet_lora_layers=convert_state_dict_to_diffusers(peft_state_dict(unet)),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
            **kwargs,
        )
        return (Path(tmp) / LORA_WEIGHT_NAME).read_bytes()


def save_diffusers_lora(
    out_dir: str | Path,
    unet: nn.Module,
    text_encoder: nn.Module | None,
    info: dict,
) -> Path:
    """Write `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(out_dir)` loads.

    `info` (base model, tokens, step) goes next to it as `dallm.json`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_bytes_atomic(diffusers_lora_bytes(unet, text_encoder), out_dir / LORA_WEIGHT_NAME)
    (out_dir / "dallm.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return out_dir / LORA_WEIGHT_NAME
