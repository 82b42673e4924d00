"""Optimizers chosen by what the machine has: bitsandbytes' 8-bit AdamW on CUDA when installed, else torch's AdamW."""

from __future__ import annotations

import torch


class AdamW8bitWhereAvailable(torch.optim.AdamW):
    """AdamW with 8-bit states (`bitsandbytes.optim.AdamW8bit`: 2 bytes of state per trainable parameter instead
    of 8) when bitsandbytes is installed and CUDA is present; else this, torch's AdamW with the same arguments.

    A class (not a factory function) so that `--model.optimizer` takes it like any optimizer class; which one ran
    is the optimizer's class, recorded in checkpoints (a resume on the other kind is refused, dallm.contract).
    """

    def __new__(cls, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.01):  # fmt: skip
        if torch.cuda.is_available():
            try:
                from bitsandbytes.optim import AdamW8bit
            except ImportError:
                pass
            else:  # not an instance of cls, so Python does not call __init__ below on it
                return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        return super().__new__(cls)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:  # fmt: skip
        """
        Args:
            params: parameters or parameter groups.
            lr: learning rate.
            betas: the moments' decay rates.
            eps: denominator term.
            weight_decay: decoupled weight decay.
        """
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
