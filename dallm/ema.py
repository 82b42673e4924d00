"""Exponential moving average of the trainable weights (LoRA + token rows), swapped in to be looked at.

Training always steps the raw weights; the average is what KID rounds sample, what the readouts measure
and what the exports write, when --model.ema_decay > 0. Swapping copies tensors exactly both ways, so
looking never changes what trains, and the average is checkpointed, so a resume continues it bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


class WeightAverage:
    """avg <- decay * avg + (1 - decay) * w after each optimizer step, for a fixed list of named parameters."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--model.ema_decay must be in (0, 1) (0 turns it off), got {decay}")
        self.decay = decay
        self.params = dict(named)
        self.average = {n: p.detach().clone().float() for n, p in named}  # starts at the initial weights

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.average[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self):
        """Inside: the parameters hold the average; after: exactly the raw weights again."""
        raw = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.average[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.average):
            raise ValueError("--ckpt_path: the checkpoint's weight average does not match this model's LoRA")
        for name, t in state.items():
            self.average[name].copy_(t)


def looked_at(module):
    """The weights to sample, measure and export inside: `module`'s average when it keeps one
    (--model.ema_decay > 0), else its own weights as they are."""
    average = getattr(module, "ema", None)
    return average.swapped() if average is not None else nullcontext()
