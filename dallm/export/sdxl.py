"""What an SDXL export writes differently from SD v1-5's (dallm.export.formats writes the rest the same way).

- Token rows: one per encoder. Every embedding file holds both, `{"clip_l": (T, 768), "clip_g": (T, 1280)}`,
  the SDXL embedding format of AUTOMATIC1111, Forge and ComfyUI; diffusers loads each key into its encoder
  (`load_textual_inversion(state["clip_l"], token=..., text_encoder=pipe.text_encoder,
  tokenizer=pipe.tokenizer)`, and `clip_g` into `text_encoder_2`/`tokenizer_2`). Per-token files hold (1, D).
- kohya names: kohya's SDXL networks name the UNet's layers by the original (SGM) model, `input_blocks`,
  `middle_block`, `output_blocks` (sd-scripts `sdxl_original_unet.py`); diffusers' converter writes the
  diffusers block names, which A1111 does not map for SDXL. `sgm_names` renames them as diffusers'
  `_maybe_map_sgm_blocks_to_diffusers` reads them back.
- The bundled embedding of the a1111 file: `bundle_emb.<name>.clip_l` and `bundle_emb.<name>.clip_g`.
- kohya metadata: `ss_base_model_version` `sdxl_base_v1-0`, `modelspec.architecture`
  `stable-diffusion-xl-v1-base/lora`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from dallm.manifest import save_safetensors

KEYS = ("clip_l", "clip_g")  # first encoder (CLIP ViT-L), second (OpenCLIP bigG), as A1111 names them
METADATA = {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}


def sgm_block(name: str, layers_per_block: int) -> str:
    """A kohya UNet key in diffusers' block names -> in SGM's (kohya's SDXL) block names; others unchanged.

    `down_blocks_i_attentions_j` -> `input_blocks_{i (n + 1) + j + 1}_1`, `mid_block_attentions_0` ->
    `middle_block_1`, `up_blocks_i_attentions_j` -> `output_blocks_{i (n + 1) + j}_1`, with n the UNet's
    layers_per_block (SGM numbers every resnet, attention and resampler of a level in one list).
    """
    n = layers_per_block

    def down(m: re.Match) -> str:
        return f"lora_unet_input_blocks_{int(m[1]) * (n + 1) + int(m[2]) + 1}_1_"

    def up(m: re.Match) -> str:
        return f"lora_unet_output_blocks_{int(m[1]) * (n + 1) + int(m[2])}_1_"

    name = re.sub(r"^lora_unet_down_blocks_(\d+)_attentions_(\d+)_", down, name)
    name = re.sub(r"^lora_unet_up_blocks_(\d+)_attentions_(\d+)_", up, name)
    return re.sub(r"^lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_", name)


def sgm_names(tensors: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """kohya tensors with the UNet keys renamed by `sgm_block`; a key left in diffusers' names is refused."""
    out = {sgm_block(k, layers_per_block): v for k, v in tensors.items()}
    left = [k for k in out if re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", k)]
    if left:
        raise ValueError(f"SDXL kohya export: no SGM name for {left[:3]} (LoRA outside the attention blocks)")
    return out


def token_rows(embeddings: dict[str, torch.Tensor], embeddings_2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"clip_l": (T, D1), "clip_g": (T, D2)}: both encoders' rows in token order."""
    return {
        key: torch.stack([v.detach().float().reshape(-1) for v in rows.values()]).contiguous()
        for key, rows in zip(KEYS, (embeddings, embeddings_2), strict=True)
    }


def save_token_files(out_dir: Path, embeddings: dict, embeddings_2: dict, metadata: dict[str, str]) -> list[Path]:
    """One file per token, `{"clip_l": (1, D1), "clip_g": (1, D2)}`, named as SD v1-5's (`<s1>` -> s1.safetensors)."""
    from dallm.tokens import token_file_name

    paths = []
    for token in embeddings:
        rows = token_rows({token: embeddings[token]}, {token: embeddings_2[token]})
        path = Path(out_dir) / token_file_name(token)
        save_safetensors(rows, path, {**metadata, "token": token})
        paths.append(path)
    return paths


def save_run_embedding(path: Path, embeddings: dict, embeddings_2: dict, metadata: dict[str, str]) -> Path:
    """The run's one embedding `<name>.safetensors` in the SDXL format, rows in token order."""
    meta = {**metadata, "tokens": json.dumps(list(embeddings)), "trigger": Path(path).stem}
    return save_safetensors(token_rows(embeddings, embeddings_2), path, meta)


def load_embedding(path: str | Path) -> dict[str, torch.Tensor]:
    """{"clip_l": (T, D1), "clip_g": (T, D2)} of a file written here (the run's or a token's)."""
    state = load_file(str(path))
    if sorted(state) != sorted(KEYS) or any(v.dim() != 2 for v in state.values()):
        raise ValueError(f"{path}: expected 2-D tensors {list(KEYS)} (an SDXL embedding), found {list(state)}")
    return state


def bundled_embedding(name: str, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A1111's bundled SDXL embedding: `bundle_emb.<name>.clip_l` and `.clip_g` (no dot allowed in `name`)."""
    if "." in name:
        raise ValueError(f"--name: {name!r} contains '.', which A1111 cannot bundle")
    return {f"bundle_emb.{name}.{key}": rows[key] for key in KEYS}


def load_textual_inversion(pipe, rows: dict[str, torch.Tensor], token: str | list[str]) -> None:
    """Add the rows to both encoders of an SDXL pipeline with diffusers' own loader: a list of T tokens gets
    one row each; one word gets all T rows (diffusers adds `word`, `word_1`, ... and expands `word` in prompts)."""
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):  # fmt: skip
        value = list(rows[key].split(1)) if isinstance(token, list) else rows[key]
        pipe.load_textual_inversion(value, token=token, text_encoder=encoder, tokenizer=tokenizer)


def load_tokens_from_export(pipe, lora_dir: Path, info: dict) -> None:
    """The export's learned tokens (and the run's trigger word) into both encoders, as `dallm sample` needs."""
    files = [lora_dir / f for f in info.get("token_files") or []]
    if files:
        rows = [load_embedding(f) for f in files]
        load_textual_inversion(pipe, {k: torch.cat([r[k] for r in rows]) for k in KEYS}, list(info["placeholder_tokens"]))
    embedding = info.get("embedding_file")
    if info.get("trigger") and embedding and (lora_dir / embedding).is_file():
        load_textual_inversion(pipe, load_embedding(lora_dir / embedding), info["trigger"])


def card_lines(info: dict, prompt: str) -> list[str]:
    """The model card's diffusers snippet for an SDXL export: the LoRA, then each embedding row set into its encoder."""
    lines = [
        "```python",
        "from diffusers import StableDiffusionXLPipeline",
        "from safetensors.torch import load_file",
        "",
        f'pipe = StableDiffusionXLPipeline.from_pretrained("{info["base_model"]}")',
        'pipe.load_lora_weights("THIS_DIR")',
    ]
    if info.get("trigger"):
        word = info["trigger"]
        lines += [
            f'emb = load_file("THIS_DIR/{info["embedding_file"]}")  # clip_l: text_encoder, clip_g: text_encoder_2',
            f'pipe.load_textual_inversion(emb["clip_l"], token="{word}", text_encoder=pipe.text_encoder, '
            "tokenizer=pipe.tokenizer)",
            f'pipe.load_textual_inversion(emb["clip_g"], token="{word}", text_encoder=pipe.text_encoder_2, '
            "tokenizer=pipe.tokenizer_2)",
        ]
    return [*lines, f'image = pipe("{prompt}", guidance_scale=7.5).images[0]', "```", ""]
