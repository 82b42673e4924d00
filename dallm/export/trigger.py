"""One trigger word per run for every tool: the run's embedding file, its name, the prompt each tool takes.

The learned placeholder tokens (`<s1>`, `<s2>`) are written once more as ONE multi-vector
textual-inversion file named after the run, `<name>.safetensors` = `{"emb_params": (T, D)}`, rows in token
order. Each tool puts the T rows where the word stands, which is the text-encoder input `<s1><s2>` gives
when written together:

- AUTOMATIC1111 and Forge: the file in `embeddings/`, the file name typed in the prompt (they find it by
  its token ids; `modules/textual_inversion/textual_inversion.py`, `EmbeddingDatabase`).
- ComfyUI: the file in `models/embeddings`, `embedding:<name>` in the prompt (`comfy/sd1_clip.py`,
  `load_embed`).
- kohya sd-scripts: `gen_img.py --textual_inversion_embeddings <name>.safetensors`, the file name in the
  prompt (it adds tokens `<name>`, `<name>1`, ...).
- diffusers: `load_textual_inversion(file, token="<name>")` adds `<name>`, `<name>_1`, ... and expands
  the word in prompts.

Why exactly one tensor under `emb_params`: A1111 and Forge read a .safetensors embedding as a flat dict
and take it only when it holds one tensor (or both SDXL keys `clip_g` and `clip_l`); a second key is
refused as "embedding file has multiple terms in it". `emb_params` is what kohya's
`train_textual_inversion.py` writes; ComfyUI takes the only tensor (it would prefer `clip_l` among
several), kohya's gen_img.py the first one.

Why the per-token names cannot serve: A1111 matches an embedding's name by token ids, and CLIP splits a
glued `<s1><s2>` into `<`, `s`, `1`, `><`, `s`, `2`, `>` before its BPE, so the middle `>` lacks the
word-end marker `<s1>` alone ends with: `<s2>`'s ids are there, `<s1>`'s are not, and `<s1>` is silently
dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from dallm.manifest import save_safetensors

EMBEDDING_KEY = "emb_params"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_trigger_name(name: str, flag: str = "--name") -> str:
    """Refuse a run name that cannot be the trigger word in every tool; returns it.

    Letters, digits, `-` and `_` only (a `.` breaks A1111's `bundle_emb.<name>.` keys, `:` its `<lora:...>`
    syntax, spaces and brackets ComfyUI's prompt parsing), and not letters alone: CLIP splits a name with a
    digit, `-` or `_` into several pieces, so it can never be a vocabulary word (diffusers refuses those)
    nor stand in for an ordinary word of the prompt (A1111 would replace that word everywhere).
    """
    if not _NAME.fullmatch(name or "") or name.isalpha():
        raise ValueError(
            f"{flag}: {name!r} cannot be the trigger word: use letters with digits, '-' or '_' "
            "(e.g. 'baroque-v1'); it is the embedding file's name and the word typed in every tool's prompt"
        )
    return name


def safe_name(raw: str) -> str:
    """`raw` made a valid trigger name: other characters become `-`; letters alone get `-v0`."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-_") or "dallm"
    return f"{name}-v0" if name.isalpha() else name


def trigger_prompt(prompt: str, tokens: list[str], word: str) -> str:
    """`prompt` with its placeholder tokens (in order, glued or spaced) replaced by the one trigger `word`.

    When the prompt does not hold them together, they are taken out and `word` is appended: the embedding's
    rows are the tokens in order, so `word` stands for all of them written together.
    """
    if not tokens:
        return prompt
    found = re.search(r"\s*".join(re.escape(t) for t in tokens), prompt)
    if found is None:
        for token in tokens:
            prompt = prompt.replace(token, " ")
        return f"{' '.join(prompt.split())} {word}".strip()
    before, after = prompt[: found.start()], prompt[found.end() :]
    # keep the word apart from the text around it: glued to a letter it would be another word
    left = " " if before[-1:].isalnum() else ""
    right = " " if after[:1].isalnum() else ""
    return f"{before}{left}{word}{right}{after}"


def save_run_embedding(
    path: str | Path, embeddings: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write the run's multi-vector embedding `{"emb_params": (T, D)}`, rows in token order."""
    rows = torch.stack([v.detach().float().reshape(-1) for v in embeddings.values()]).contiguous()  # (T, D)
    meta = {**metadata, "tokens": json.dumps(list(embeddings)), "trigger": Path(path).stem}
    return save_safetensors({EMBEDDING_KEY: rows}, path, meta)


def load_run_embedding(path: str | Path) -> torch.Tensor:
    """The (T, D) rows of a file written by `save_run_embedding`."""
    state = load_file(str(path))
    if list(state) != [EMBEDDING_KEY] or state[EMBEDDING_KEY].dim() != 2:
        raise ValueError(f"{path}: expected one 2-D tensor {EMBEDDING_KEY!r}, found {list(state)}")
    return state[EMBEDDING_KEY]


def tool_prompts(info: dict) -> dict[str, str]:
    """The prompt to type in each tool for an export (its `dallm.json` info), by tool.

    Keys: `diffusers` (the trigger word), `diffusers (per-token files)` (the prompt as trained), and with a
    kohya file `a1111`, `forge`, `comfyui`, `kohya`; with an a1111 file `a1111 (one file)`.
    """
    prompt, word = info["instance_prompt"], info.get("trigger")
    toks = list(info.get("placeholder_tokens") or []) if word else []
    trigger = trigger_prompt(prompt, toks, word) if word else prompt
    out = {"diffusers": trigger}
    if info.get("token_files"):
        out["diffusers (per-token files)"] = prompt
    if info.get("kohya_file"):
        out["a1111"] = out["forge"] = f"<lora:{Path(info['kohya_file']).stem}:1> {trigger}"
        out["comfyui"] = trigger_prompt(prompt, toks, f"embedding:{word}") if word else prompt
        out["kohya"] = trigger
    if info.get("a1111_file"):
        out["a1111 (one file)"] = f"<lora:{Path(info['a1111_file']).stem}:1> {trigger}"
    return out
