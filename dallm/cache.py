"""Caches of frozen computations: VAE latents of training images, text-encoder states of fixed prompts.

The VAE encoder costs more than half of an SD LoRA step (1.1 TFLOP per 512 px image) and gives the same
answer for the same pixels every time, so each image variant (content, resolution, crop, flip) is
encoded once. What is cached is the latent *distribution* (mean and log-variance), and the latent is
still sampled from it with the step's own generator: the cached path draws exactly what the uncached
one would, so caching changes speed, not results.

Every image is encoded on its own (`encode_each`), cached or not: a convolution over a batch may sum in
another order than over one image (oneDNN picks its algorithm by shape), so a latent encoded beside other
images differed in the 7th digit from the same image encoded alone. The cache fills in whatever order the
data stream first shows each image, which differs after a resume, and that was the whole of a resumed
run's 1e-7 gap to an uninterrupted one; one image per call makes each latent a function of its pixels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dallm.manifest import save_safetensors


def vae_identity(vae, source: str) -> str:
    """A short id of the VAE: source, dtype, config and a fingerprint of its weights.

    Part of every cache key, so a different VAE (or dtype) never reads another's latents.
    """
    h = hashlib.sha256()
    h.update(source.encode())
    h.update(str(vae.dtype).encode())
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for p in list(vae.parameters())[:4]:  # the first convs: any retrained VAE differs here
        if not p.is_meta:  # shape-only models (benchmarks, tests) have no values to fingerprint
            h.update(p.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


def encode_each(encode, pixels: torch.Tensor) -> torch.Tensor:
    """`encode` applied to each image of (N, 3, H, W) `pixels` alone: (N, ...) whatever else is in the batch."""
    return torch.cat([encode(pixels[i : i + 1]) for i in range(pixels.shape[0])])


class LatentCache:
    """(variant key -> latent-distribution parameters (2C, h, w)), in memory and optionally on disk."""

    def __init__(self, vae_id: str, cache_dir: str | Path | None = None) -> None:
        self.vae_id = vae_id
        self.dir = Path(cache_dir) / vae_id if cache_dir else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _file(self, key: str) -> Path:
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.dir is not None and self._file(key).exists():
            tensor = load_file(str(self._file(key)))["params"]
            self.memory[key] = tensor
            return tensor
        return None

    def put(self, key: str, params: torch.Tensor) -> None:
        params = params.detach().cpu().contiguous()
        self.memory[key] = params
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            # atomic (a crash never leaves a half-written entry), readable as the umask says
            save_safetensors({"params": params}, self._file(key), {"key": key, "vae": self.vae_id})

    def latent_params(self, keys: list[str], pixels: torch.Tensor, encode) -> torch.Tensor:
        """Parameters for each key, encoding only the misses (each on its own): (N, 2C, h, w)."""
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # a key's first position in the batch
        missing = [k for k in first if self.get(k) is None]
        if missing:
            fresh = encode_each(encode, pixels[[first[k] for k in missing]])  # (M, 2C, h, w)
            for key, params in zip(missing, fresh, strict=True):
                self.put(key, params)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack([self.memory[k] for k in keys]).to(pixels.device)
