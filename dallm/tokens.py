"""Placeholder tokens for pivotal tuning: add them, train only their rows, save them for diffusers.

The new rows live in their own small parameter instead of a resized embedding table, so every other
row of the table is bit-identical to the base model by construction (no gradient masking, no weight
decay leaking into frozen rows, no row restoring after each step).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dallm.manifest import save_safetensors


class PlaceholderEmbedding(nn.Module):
    """Drop-in for the text encoder's `nn.Embedding`: a frozen base table plus trainable new rows.

    Ids `>= first_new_id` read row `id - first_new_id` of `new_embeddings`; all other ids read the
    frozen base table unchanged.
    """

    def __init__(self, base: nn.Embedding, first_new_id: int, init: torch.Tensor) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.first_new_id = first_new_id
        # Trainable rows stay fp32 even when the base table is stored in half precision.
        self.new_embeddings = nn.Parameter(init.detach().clone().float())  # (T, D)

    @property
    def num_embeddings(self) -> int:
        return self.first_new_id + self.new_embeddings.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The full table as diffusers would build it after `load_textual_inversion` (read-only view)."""
        base = self.base.weight[: self.first_new_id]
        return torch.cat([base, self.new_embeddings.to(base.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id  # (B, L)
        out = self.base(input_ids.masked_fill(is_new, 0))  # (B, L, D)
        new = F.embedding((input_ids - self.first_new_id).clamp(min=0), self.new_embeddings)
        return torch.where(is_new.unsqueeze(-1), new.to(out.dtype), out)


def check_placeholder_tokens(tokenizer, tokens: list[str], initializer_token: str | None) -> None:
    """Refuse placeholder tokens the tokenizer already knows, and an initializer that is not one token.

    Needs only the tokenizer, so `fit` runs it before class images are generated. A placeholder that is a
    vocabulary entry itself (`<|endoftext|>`) or that tokenizes to one (`circle` -> `circle</w>`: CLIP
    stores whole words with an end-of-word marker) would take that word away from every other prompt.
    """
    if not tokens:
        raise ValueError("--model.placeholder_tokens is empty: pivotal tuning needs at least one token")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"--model.placeholder_tokens has duplicates: {tokens}")
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not token or token.strip() != token or " " in token:
            raise ValueError(
                f"--model.placeholder_tokens: {token!r} must be a non-empty string without spaces"
            )
        pieces = tokenizer.tokenize(token)
        if token in vocab or (len(pieces) == 1 and pieces[0] in vocab):
            raise ValueError(
                f"--model.placeholder_tokens: {token!r} is already in the tokenizer's vocabulary"
                f"{f' as {pieces[0]!r}' if token not in vocab else ''}; choose a string it does not know, "
                "such as '<s1>'"
            )
    if initializer_token is not None:
        init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(init_ids)
            raise ValueError(
                f"--model.initializer_token: {initializer_token!r} is {len(init_ids)} tokens {pieces}, "
                "not one; choose a single-token word"
            )


def add_placeholder_tokens(
    tokenizer, text_encoder: nn.Module, tokens: list[str], initializer_token: str | None
) -> PlaceholderEmbedding:
    """Add `tokens` to `tokenizer` as distinct new ids and give `text_encoder` trainable rows for them.

    Rows are initialised from the embedding of `initializer_token` (one token), or randomly with the
    table's own scale when it is None.
    """
    check_placeholder_tokens(tokenizer, tokens, initializer_token)
    vocab = tokenizer.get_vocab()
    base: nn.Embedding = text_encoder.get_input_embeddings()
    if isinstance(base, PlaceholderEmbedding):
        raise ValueError("the text encoder already has placeholder tokens")

    if initializer_token is not None:
        init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
        init = base.weight[init_ids[0]].detach().float().expand(len(tokens), -1)
    else:
        std = base.weight.detach().float().std()
        init = torch.randn(len(tokens), base.embedding_dim) * std

    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    first = ids[0]
    # The wrapper maps ids >= first to new rows, so the new ids must be consecutive and above every old id.
    if ids != list(range(first, first + len(tokens))) or first <= max(vocab.values()):
        raise RuntimeError(
            f"tokenizer gave ids {ids} to {tokens}; expected consecutive ids after the vocabulary"
        )
    wrapped = PlaceholderEmbedding(base, first, init)
    text_encoder.set_input_embeddings(wrapped)
    return wrapped


def embeddings_by_token(embedding: PlaceholderEmbedding, tokens: list[str]) -> dict[str, torch.Tensor]:
    """{token: (D,) fp32 tensor} of the learned rows, in token order."""
    rows = embedding.new_embeddings.detach().float().cpu()
    return {token: rows[i].clone().contiguous() for i, token in enumerate(tokens)}


def token_file_name(token: str) -> str:
    """A portable file name for one token's embedding: `<s1>` -> `s1.safetensors`."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", token) or "token"
    return f"{stem}.safetensors"


def save_token_embeddings(
    out_dir: str | Path, embeddings: dict[str, torch.Tensor], metadata: dict[str, str]
) -> list[Path]:
    """Write one diffusers textual-inversion file per token: `{token: (1, D)}`, the single-key format.

    One file per token (not one (T, D) tensor under one name) because diffusers' `load_textual_inversion`
    turns a multi-row embedding into `<s1>`, `<s1>_1`, ... and `<s2>` would not exist. (1, D) as diffusers'
    own textual-inversion script writes it: kohya's `gen_img.py` counts the rows of the tensor as vectors,
    so a 1-D (D,) file would become D one-number vectors there.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for token, vector in embeddings.items():
        path = out_dir / token_file_name(token)
        row = vector.detach().float().reshape(1, -1).contiguous()  # (1, D)
        save_safetensors({token: row}, path, {**metadata, "token": token})
        paths.append(path)
    return paths


def load_token_embeddings(paths: list[str | Path]) -> dict[str, torch.Tensor]:
    """Read files written by `save_token_embeddings` back into {token: (D,)} (older 1-D files too)."""
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        state = load_file(str(path))
        if len(state) != 1:
            raise ValueError(f"{path}: expected one token embedding, found keys {list(state)}")
        ((token, vector),) = state.items()
        if vector.dim() == 2 and vector.shape[0] != 1:
            raise ValueError(f"{path}: expected one vector for {token!r}, found shape {tuple(vector.shape)}")
        out[token] = vector.reshape(-1)
    return out
