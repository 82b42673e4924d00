"""The formats a trained LoRA is exported in, for the tools people use (the command is dallm.export.command).

Formats, all in one directory per exported step (`<name>` is the run's name, e.g. `toy-v0`):
- always, when the run learned tokens: `<name>.safetensors`, both token rows as ONE multi-vector
  textual-inversion embedding `{"emb_params": (T, D)}`, so `<name>` is the one trigger word in every tool
  (see dallm.export.trigger).
- `diffusers`: `pytorch_lora_weights.safetensors` + one textual-inversion file per token, `{token: (1, D)}`
  (`load_lora_weights` + `load_textual_inversion`).
- `kohya`: `<name>-lora.safetensors`, kohya's `lora_unet_*`/`lora_te_*` keys with `.alpha` and kohya's
  `ss_*` metadata, nothing else: every key maps to a layer in A1111, Forge, ComfyUI and kohya's networks.lora,
  so none of them warns (a bundled token is a "lora key not loaded" in ComfyUI, an "unmatched key" in Forge,
  and Forge never reads it). With the embedding file it serves all four.
- `a1111`: `<name>-a1111.safetensors`, the kohya file plus the embedding bundled as
  `bundle_emb.<name>.string_to_param.*` (T, D): AUTOMATIC1111 alone needs no embedding file with it.
The key conversion is diffusers' own `convert_state_dict_to_kohya`; only the alpha values, the SD1
text-encoder prefix, the bundle and the metadata are written here. A model card (`README.md`) with the KID
curve and the step's sample grid says which file goes where in each tool and what to type.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save

from dallm import tokens
from dallm.export import sdxl as sdxl_export
from dallm.export.card import write_model_card
from dallm.export.trained import Trained, from_module
from dallm.export.trigger import check_trigger_name, safe_name, save_run_embedding, trigger_prompt
from dallm.lora import LORA_WEIGHT_NAME
from dallm.manifest import save_bytes_atomic, save_safetensors

FORMATS = ("diffusers", "kohya", "a1111")
DEFAULT_FORMATS = ["diffusers", "kohya"]
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
    """The run's name, the trigger word and the files' stem: `<logger name>-v<k>` for lightning_logs/<name>/version_k.

    Characters a tool's prompt syntax would take apart become `-` (see `dallm.export.trigger.safe_name`).
    """
    run_dir = Path(run_dir).resolve()
    if run_dir.name.startswith("version_"):
        return safe_name(f"{run_dir.parent.name}-v{run_dir.name.removeprefix('version_')}")
    return safe_name(run_dir.name)


def file_names(name: str) -> dict[str, str]:
    """The files of an export named `name`, by role."""
    return {"embedding": f"{name}.safetensors", "kohya": f"{name}-lora.safetensors",
            "a1111": f"{name}-a1111.safetensors"}  # fmt: skip


# ---------------------------------------------------------------------------------------------- kohya
def kohya_state_dict(
    unet: dict[str, torch.Tensor], text_encoder: dict[str, torch.Tensor] | None, alpha: float
) -> dict[str, torch.Tensor]:
    """kohya-format LoRA weights from the peft state dicts of the UNet (and the text encoder, when trained).

    diffusers' converter writes alpha = rank (scale 1); the run's own alpha goes in instead, so that A1111's
    scale alpha/rank equals peft's. SD1 text-encoder keys are `lora_te_text_model_encoder_...` as A1111 and
    ComfyUI expect (diffusers writes SDXL's `lora_te1_`, and transformers 5 names lack `text_model`).
    """
    from diffusers.utils import convert_state_dict_to_kohya

    peft = {f"unet.{k}": v for k, v in unet.items()}
    peft.update({f"text_encoder.{k}": v for k, v in (text_encoder or {}).items()})
    if any("lora_magnitude_vector" in k for k in peft):
        raise ValueError(DORA_MESSAGE)
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


# peft normalises DoRA per output row, A1111/LyCORIS per input column: no exact kohya form exists.
DORA_MESSAGE = (
    "--model.use_dora: the kohya format cannot hold peft's DoRA exactly (A1111 normalises the weight "
    "per input channel, peft per output channel); export --format diffusers"
)


def bundled_embedding(name: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The run's embedding (T, D) in A1111's bundled form, `bundle_emb.<name>.string_to_param.*`.

    A1111 takes the name up to the key's next dot (so none in `name`) and registers the rows as an
    embedding of that name, exactly as if `<name>.safetensors` were in its embeddings folder.
    """
    if "." in name:
        raise ValueError(f"--name: {name!r} contains '.', which A1111 cannot bundle")
    return {f"bundle_emb.{name}.string_to_param.*": rows.detach().float().contiguous()}


def kohya_metadata(info: dict, run: dict, kid: dict) -> dict[str, str]:
    """kohya sd-scripts' `ss_*` keys (those that apply), a few `modelspec.*` keys, and dallm's own.

    `ss_instance_prompt` is the trigger prompt: A1111, Forge and kohya read `<name>` (the embedding file's
    name) where the run wrote `<s1><s2>`.
    """
    word = info.get("trigger")
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
            {"teacher": {info["trigger_prompt"]: run.get("num_train_images") or 1}}
        ),
        "ss_training_comment": "dallm LoRA + pivotal tokens"
        + (
            f"; trigger word {word}: put {info['embedding_file']} in the embeddings folder "
            f"(ComfyUI: embedding:{word})"
            if word
            else ""
        ),  # fmt: skip
        "ss_instance_prompt": info["trigger_prompt"],
        "ss_placeholder_tokens": json.dumps(info["placeholder_tokens"]),
        "ss_kid_val": kid.get("kid/val"),
        "ss_kid_val_std": kid.get("kid/val_std"),
        "ss_kid_val_se": kid.get("kid/val_se"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": run.get("name"),
        "modelspec.trigger_phrase": word,
    }
    return {k: str(v) for k, v in meta.items() if v is not None}


def save_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write the kohya file with kohya's `sshs_*` hashes (sha256 of the tensor bytes, A1111's LoRA hash)."""
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    meta = dict(metadata)
    meta["sshs_model_hash"] = hashlib.sha256(blob[8 + header :]).hexdigest()
    meta["sshs_legacy_hash"] = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return save_safetensors(tensors, path, meta)


# ---------------------------------------------------------------------------------------------- all
def kid_at(history: list[dict], step: int) -> dict:
    """The KID numbers of the round at `step` ({} when none ran there)."""
    row = next((h for h in history if h.get("step") == step), {})
    return {k: row[k] for k in KIDS if k in row}


# What `write_trained` adds to the module's export_info (dropped from a re-read dallm.json first).
WRITTEN = {"global_step", "step", "resolution", *KIDS, "token_files", "diffusers_file", "embedding_file",
           "kohya_file", "a1111_file", "trigger", "trigger_prompt", "run", "kid_history"}  # fmt: skip


def write_trained(
    trained: Trained,
    out_dir: str | Path,
    step: int,
    formats: list[str] = DEFAULT_FORMATS,  # noqa: B006 (read-only)
    run: dict | None = None,
    history: list[dict] | None = None,
    samples_png: str | Path | None = None,
) -> Path:
    """Write `trained` (the LoRA at `step`) in `formats`, the run's embedding and a model card into `out_dir`.

    `run` holds the run's facts (name, dataset sizes, resolution, lr, ...; see `LoraExport.run_info`),
    `history` the KID rounds so far, `samples_png` the step's sample grid. Both go into `dallm.json` too,
    so an export directory can be exported again on its own.
    """
    formats = check_formats(formats)
    run, history = dict(run or {}), list(history or [])
    # a name from older run facts may hold characters a tool's prompt syntax takes apart: made safe here
    # (`dallm export --name` is checked strictly before any work)
    run["name"] = name = check_trigger_name(safe_name(run.get("name") or "dallm"), "--name")
    names = file_names(name)
    toks = list(trained.embeddings)
    if toks and names["embedding"] in {tokens.token_file_name(t) for t in toks}:
        raise ValueError(f"--name: {name!r} would give the embedding file the name of a token's file")
    if trained.info.get("use_dora") and {"kohya", "a1111"} & set(formats):
        raise ValueError(DORA_MESSAGE)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kid = kid_at(history, step)
    info = {k: v for k, v in trained.info.items() if k not in WRITTEN}
    info.update(
        {"global_step": step, "step": step, "resolution": run.get("resolution"), **kid, "token_files": []}
    )
    meta = {"base_model": str(info["base_model"])}
    xl = bool(info.get("sdxl"))  # both encoders' rows in every embedding file, SGM kohya names (dallm.export.sdxl)
    if "diffusers" in formats:
        save_bytes_atomic(trained.diffusers_lora, out_dir / LORA_WEIGHT_NAME)
        info["diffusers_file"] = LORA_WEIGHT_NAME
        if xl:
            paths = sdxl_export.save_token_files(out_dir, trained.embeddings, trained.embeddings_2, meta)
        else:
            paths = tokens.save_token_embeddings(out_dir, trained.embeddings, meta)
        info["token_files"] = [p.name for p in paths]
    if toks:
        if xl:
            sdxl_export.save_run_embedding(out_dir / names["embedding"], trained.embeddings, trained.embeddings_2, meta)
        else:
            save_run_embedding(out_dir / names["embedding"], trained.embeddings, meta)
        info.update(embedding_file=names["embedding"], trigger=name)
    info["trigger_prompt"] = (
        trigger_prompt(info["instance_prompt"], toks, name) if toks else info["instance_prompt"]
    )
    if {"kohya", "a1111"} & set(formats):
        lora_tensors = kohya_state_dict(trained.unet, trained.text_encoder, info["alpha"])
        if xl:
            lora_tensors = sdxl_export.sgm_names(lora_tensors, int(info["unet_layers_per_block"]))
        for fmt in ("kohya", "a1111"):
            if fmt in formats:
                info[f"{fmt}_file"] = names[fmt]
        metadata = kohya_metadata(info, run, kid)
        if xl:
            metadata.update(sdxl_export.METADATA)
        if "kohya" in formats:
            save_kohya(out_dir / names["kohya"], lora_tensors, metadata)
        if "a1111" in formats:
            if xl:
                rows = sdxl_export.token_rows(trained.embeddings, trained.embeddings_2)
                bundle = sdxl_export.bundled_embedding(name, rows) if toks else {}
            else:
                rows = torch.stack(list(trained.embeddings.values())) if toks else None
                bundle = bundled_embedding(name, rows) if rows is not None else {}
            save_kohya(out_dir / names["a1111"], {**lora_tensors, **bundle}, metadata)
    info.update(run=run, kid_history=history)
    (out_dir / "dallm.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    write_model_card(out_dir, info, run, history, samples_png)
    return out_dir


def write_exports(
    module,
    out_dir: str | Path,
    step: int,
    formats: list[str] = DEFAULT_FORMATS,  # noqa: B006 (read-only)
    run: dict | None = None,
    history: list[dict] | None = None,
    samples_dir: str | Path | None = None,
) -> Path:
    """Write the LoRA of a DallmModule at `step` in `formats` plus a model card into `out_dir`.

    `samples_dir` is the run's `samples/` with the KID rounds' grids (`step=NNNNNN.png`).
    """
    grid = Path(samples_dir) / f"step={step:06d}.png" if samples_dir else None
    return write_trained(from_module(module), out_dir, step, formats, run, history, grid)


def copy_export(src: Path, dst: Path) -> None:
    """Copy an export directory over `dst` atomically (a copy beside, then a rename): never half-written."""
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
