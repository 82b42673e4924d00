"""Optimizers chosen by what the machine has: bitsandbytes' 8-bit AdamW on CUDA when installed, else torch's AdamW."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw_8bit_where_available(
    params: Iterable,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> torch.optim.Optimizer:
    """AdamW with 8-bit states (bitsandbytes.optim.AdamW8bit: 2 bytes per trainable parameter instead of 8) when
    bitsandbytes is installed and a CUDA device is present, else torch.optim.AdamW with the same arguments.

    Which one ran is the optimizer's class, recorded in checkpoints (a resume on the other kind is refused).
    """
    if torch.cuda.is_available():
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError:
            pass
        else:
            return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
