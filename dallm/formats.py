"""The formats a trained LoRA is exported in, for the tools people use (the command is dallm.export).

Formats, all in one directory per exported step:
- `diffusers`: `pytorch_lora_weights.safetensors` + one textual-inversion file per token (`load_lora_weights`
  + `load_textual_inversion`).
- `kohya`: `<run name>.safetensors`, kohya's `lora_unet_*`/`lora_te_*` keys with `.alpha`, the placeholder
  tokens bundled as `bundle_emb.<token>.string_to_param.*` (AUTOMATIC1111 1.5+, Forge) and kohya's `ss_*`
  metadata. The key conversion is diffusers' own `convert_state_dict_to_kohya`; only the alpha values, the
  SD1 text-encoder prefix, the bundled tokens and the metadata are written here.
- a model card (`README.md`) with the KID curve (`kid_curve.png`) and the sample grid of that step.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from dallm import lora, tokens
from dallm.card import write_model_card

FORMATS = ("diffusers", "kohya")
KIDS = (
    "kid/val",
    "kid/val_std",
    "kid/val_se",
    "kid/train",
)  # copied into dallm.json when the step has a round


def check_formats(formats: list[str], flag: str = "--format") -> list[str]:
    """Validate a list of export formats; returns it without duplicates, in order."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"{flag}: unknown or empty formats {bad or formats}; choose from {list(FORMATS)}")
    return list(dict.fromkeys(formats))


def run_name(run_dir: str | Path) -> str:
    """The name A1111/ComfyUI show for the LoRA: `<logger name>-v<k>` for lightning_logs/<name>/version_k."""
    run_dir = Path(run_dir).resolve()
    if run_dir.name.startswith("version_"):
        return f"{run_dir.parent.name}-v{run_dir.name.removeprefix('version_')}"
    return run_dir.name


# ---------------------------------------------------------------------------------------------- kohya
def kohya_state_dict(unet, text_encoder, alpha: float) -> dict[str, torch.Tensor]:
    """kohya-format LoRA weights of the peft-carrying `unet` (and `text_encoder`, when trained), fp32.

    diffusers' converter writes alpha = rank (scale 1); the run's own alpha goes in instead, so that A1111's
    scale alpha/rank equals peft's. SD1 text-encoder keys are `lora_te_text_model_encoder_...` as A1111 and
    ComfyUI expect (diffusers writes SDXL's `lora_te1_`, and transformers 5 names lack `text_model`).
    """
    from diffusers.utils import convert_state_dict_to_kohya

    peft = {f"unet.{k}": v for k, v in lora.peft_state_dict(unet).items()}
    if text_encoder is not None:
        peft.update({f"text_encoder.{k}": v for k, v in lora.peft_state_dict(text_encoder).items()})
    if any("lora_magnitude_vector" in k for k in peft):
        # peft normalises DoRA per output row, A1111/LyCORIS per input column: no exact kohya form exists.
        raise ValueError(
            "--model.use_dora: the kohya format cannot hold peft's DoRA exactly (A1111 normalises the weight "
            "per input channel, peft per output channel); export --format diffusers"
        )
    out = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        if key.startswith("lora_te1_"):
            key = "lora_te_" + key.removeprefix("lora_te1_")
        if key.startswith("lora_te_encoder_"):  # transformers 5 dropped CLIPTextModel's `text_model.` level
            key = "lora_te_text_model_" + key.removeprefix("lora_te_")
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha))
        out[key] = value.contiguous()
    return out


def bundled_embeddings(embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{token: (D,)} -> A1111's bundled form `bundle_emb.<token>.string_to_param.*`: (1, D) each."""
    out = {}
    for token, vector in embeddings.items():
        if "." in token:  # A1111 splits the key on the first two dots
            raise ValueError(f"--model.placeholder_tokens: {token!r} contains '.', which A1111 cannot bundle")
        out[f"bundle_emb.{token}.string_to_param.*"] = vector.detach().float().reshape(1, -1).contiguous()
    return out


def kohya_metadata(info: dict, run: dict, kid: dict) -> dict[str, str]:
    """kohya sd-scripts' `ss_*` keys (those that apply), a few `modelspec.*` keys, and dallm's own."""
    tokens_ = info["placeholder_tokens"]
    trigger = " ".join(tokens_)  # A1111 matches each token on its own: space-separated, not "<s1><s2>"
    meta = {
        "ss_sd_model_name": Path(str(info["base_model"])).name,
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": info["rank"],
        "ss_network_alpha": info["alpha"],
        "ss_network_args": json.dumps({"target_modules": info["target_modules"]}),
        "ss_steps": info["global_step"],
        "ss_max_train_steps": run.get("max_steps"),
        "ss_num_train_images": run.get("num_train_images"),
        "ss_num_validation_images": run.get("num_val_images"),
        "ss_num_reg_images": run.get("num_reg_images"),
        "ss_resolution": run.get("resolution"),
        "ss_learning_rate": run.get("learning_rate"),
        "ss_seed": run.get("seed"),
        "ss_prior_loss_weight": run.get("prior_loss_weight"),
        "ss_noise_offset": run.get("noise_offset"),
        "ss_output_name": run.get("name"),
        "ss_tag_frequency": json.dumps(
            {"teacher": {info["instance_prompt"]: run.get("num_train_images") or 1}}
        ),
        "ss_training_comment": f"dallm LoRA + pivotal tokens; trigger words: {trigger}",
        "ss_instance_prompt": info["instance_prompt"],
        "ss_placeholder_tokens": json.dumps(tokens_),
        "ss_kid_val": kid.get("kid/val"),
        "ss_kid_val_std": kid.get("kid/val_std"),
        "ss_kid_val_se": kid.get("kid/val_se"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": run.get("name"),
        "modelspec.trigger_phrase": trigger,
    }
    return {k: str(v) for k, v in meta.items() if v is not None}


def save_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write the kohya file with kohya's `sshs_*` hashes (sha256 of the tensor bytes, A1111's LoRA hash)."""
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    meta = dict(metadata)
    meta["sshs_model_hash"] = hashlib.sha256(blob[8 + header :]).hexdigest()
    meta["sshs_legacy_hash"] = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    save_file(tensors, str(path), metadata=meta)
    return path


# ---------------------------------------------------------------------------------------------- all
def kid_at(history: list[dict], step: int) -> dict:
    """The KID numbers of the round at `step` ({} when none ran there)."""
    row = next((h for h in history if h.get("step") == step), {})
    return {k: row[k] for k in KIDS if k in row}


def write_exports(
    module,
    out_dir: str | Path,
    step: int,
    formats: list[str] = list(FORMATS),  # noqa: B006 (read-only)
    run: dict | None = None,
    history: list[dict] | None = None,
    samples_dir: str | Path | None = None,
) -> Path:
    """Write the LoRA of `module` at `step` in `formats` plus a model card into `out_dir`.

    `run` holds the run's facts (name, dataset sizes, resolution, lr, ...; see `LoraExport.run_info`),
    `history` the KID rounds so far, `samples_dir` the run's `samples/` with the KID rounds' grids.
    """
    formats = check_formats(formats)
    run, history = dict(run or {}), list(history or [])
    run.setdefault("name", "dallm")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hp = module.hparams
    kid = kid_at(history, step)
    emb = module.token_embedding
    embeddings = tokens.embeddings_by_token(emb, list(hp.placeholder_tokens)) if emb is not None else {}
    if "diffusers" in formats:
        module.export(out_dir)
    elif embeddings:  # ComfyUI reads the tokens from these files, whatever the LoRA's format
        tokens.save_token_embeddings(
            out_dir, embeddings, {"base_model": str(hp.pretrained_model_name_or_path)}
        )
    info = {
        **module.export_info(),
        "global_step": step,
        "step": step,
        "resolution": run.get("resolution"),
        **kid,
    }
    if "kohya" in formats:
        tensors = kohya_state_dict(
            module.unet, module.text_encoder if hp.train_text_encoder else None, info["alpha"]
        )
        tensors.update(bundled_embeddings(embeddings))
        kohya_file = out_dir / f"{run['name']}.safetensors"
        save_kohya(kohya_file, tensors, kohya_metadata(info, run, kid))
        info["kohya_file"] = kohya_file.name
    (out_dir / "dallm.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    write_model_card(out_dir, info, run, history, samples_dir)
    return out_dir


def copy_export(src: Path, dst: Path) -> None:
    """Copy an export directory over `dst` atomically (a copy beside, then a rename): never half-written."""
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
