"""What an export is made of, taken from a training module or from an export directory already on disk.

`Trained` holds the LoRA in peft naming (fp32, CPU), the diffusers file's bytes, the learned token rows and
the run's facts; `dallm.export.formats.write_trained` writes every format from it. From an export directory
(`lora/last`, `lora/best`, `lora/step=N`, or a copy of one) nothing else is needed: no checkpoint, no
base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes

from dallm import lora, tokens
from dallm.export.trigger import load_run_embedding


@dataclass
class Trained:
    """One step's trained weights and facts, ready to export."""

    unet: dict[str, torch.Tensor]  # the UNet's LoRA, peft naming
    text_encoder: dict[str, torch.Tensor] | None  # the text encoder's LoRA when it was trained
    diffusers_lora: bytes  # pytorch_lora_weights.safetensors as diffusers writes it
    embeddings: dict[str, torch.Tensor]  # {token: (D,)} in token order
    info: dict  # DallmModule.export_info(): base model, rank, alpha, targets, tokens, instance prompt, ...
    embeddings_2: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL's second encoder's rows


def from_module(module) -> Trained:
    """The trainable state of a DallmModule; raises DivergedError on non-finite weights."""
    module.check_finite("at the LoRA export")  # lora/last stays the last finite export
    hp = module.hparams
    te = module.text_encoder if hp.train_text_encoder else None
    emb, emb_2 = module.token_embedding, module.token_embedding_2
    return Trained(
        unet=lora.peft_state_dict(module.unet),
        text_encoder=lora.peft_state_dict(te) if te is not None else None,
        diffusers_lora=lora.diffusers_lora_bytes(module.unet, te),
        embeddings=tokens.embeddings_by_token(emb, list(hp.placeholder_tokens)) if emb is not None else {},
        info=module.export_info(),
        embeddings_2=tokens.embeddings_by_token(emb_2, list(hp.placeholder_tokens)) if emb_2 is not None else {},
    )


def resolve_lora_dir(path: str | Path, flag: str = "--lora") -> Path:
    """A LoRA export dir (with dallm.json), or a run dir (its `lora/best`, else `lora/last`)."""
    path = Path(path)
    if (path / "dallm.json").is_file():
        return path
    for name in ("best", "last"):
        if (path / "lora" / name / "dallm.json").is_file():
            return path / "lora" / name
    raise FileNotFoundError(
        f"{flag} {path}: neither an export dir (with dallm.json) nor a run dir with lora/best|last"
    )


def from_lora_dir(lora_dir: str | Path) -> tuple[Trained, dict]:
    """The export in `lora_dir` read back, and its whole `dallm.json` (run facts, KID history, ...).

    The LoRA comes from the diffusers file (converted back to peft naming with diffusers' own converters,
    exact in fp32); the token rows from the run's embedding file, else from the per-token files.
    """
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    lora_dir = Path(lora_dir)
    info = json.loads((lora_dir / "dallm.json").read_text())
    weights = lora_dir / lora.LORA_WEIGHT_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"SOURCE {lora_dir}: no {weights.name} in it (it was exported without diffusers)"
        )
    blob = weights.read_bytes()
    state = load_bytes(blob)
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    te = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    toks = list(info.get("placeholder_tokens") or [])
    embeddings_2 = {}
    if info.get("sdxl") and toks:
        from dallm.export.sdxl import load_embedding

        files = [lora_dir / info["embedding_file"]] if info.get("embedding_file") else []
        files = [f for f in files if f.is_file()] or [lora_dir / f for f in info.get("token_files") or []]
        rows = [load_embedding(f) for f in files]
        embeddings, embeddings_2 = (
            {t: r for t, r in zip(toks, torch.cat([x[key] for x in rows]), strict=True)} for key in ("clip_l", "clip_g")
        )
    elif info.get("embedding_file") and (lora_dir / info["embedding_file"]).is_file():
        rows = load_run_embedding(lora_dir / info["embedding_file"])  # (T, D)
        embeddings = {t: rows[i].clone() for i, t in enumerate(toks)}
    else:
        files = [lora_dir / f for f in info.get("token_files") or []]
        embeddings = tokens.load_token_embeddings(files) if files else {}
    if list(embeddings) != toks:
        raise ValueError(f"SOURCE {lora_dir}: holds token rows {list(embeddings)}, dallm.json lists {toks}")
    trained = Trained(
        unet=convert_unet_state_dict_to_peft(unet),
        text_encoder=convert_state_dict_to_peft(te) if te else None,
        diffusers_lora=blob,
        embeddings=embeddings,
        info=info,
        embeddings_2=embeddings_2,
    )
    return trained, info
