"""The training objective's UNet rows and loss terms, as pure bookkeeping and math.

A step asks the LoRA-carrying student and the frozen base (adapters off) for noise predictions of several
(latent, prompt) pairs: the batch's own prompts, the empty prompt (held at the base's, the branch
classifier-free guidance extrapolates from), the class prompt and any further held prompts (held at the
base's: what the LoRA must not move). `RowPlan` collects the distinct pairs of each model, so the student
makes one batched call with gradients and the base one batched no-grad call, whatever terms are on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dallm.diffusion import per_sample_mse

HOLD_LATENTS = ("all", "instance", "prior")


class RowPlan:
    """The distinct (latent index, prompt) rows of one batched UNet call, in the order first asked for."""

    def __init__(self) -> None:
        self._rows: dict[tuple[int, str], int] = {}

    def add(self, index: Sequence[int], prompts: str | Sequence[str]) -> None:
        """Ask for the prediction of latent index[i] under prompts[i] (one prompt: the same for all)."""
        prompts = [prompts] * len(index) if isinstance(prompts, str) else list(prompts)
        for i, p in zip(index, prompts, strict=True):
            self._rows.setdefault((int(i), p), len(self._rows))

    def rows(self, index: Sequence[int], prompts: str | Sequence[str]) -> torch.Tensor:
        """Positions in the call's output of the asked pairs: (len(index),) long."""
        prompts = [prompts] * len(index) if isinstance(prompts, str) else list(prompts)
        return torch.tensor(
            [self._rows[(int(i), p)] for i, p in zip(index, prompts, strict=True)], dtype=torch.long
        )

    @property
    def latents(self) -> torch.Tensor:
        """Latent index of each row: (R,) long."""
        return torch.tensor([i for i, _ in self._rows], dtype=torch.long)

    @property
    def prompts(self) -> list[str]:
        return [p for _, p in self._rows]

    def __len__(self) -> int:
        return len(self._rows)


def hold_index(is_prior: torch.Tensor, which: str) -> list[int]:
    """Latents a held prompt is compared on: all of the batch, the teacher (instance) ones or the class images'."""
    if which not in HOLD_LATENTS:
        raise ValueError(f"--model.hold_latents must be one of {HOLD_LATENTS}, got {which!r}")
    flags = is_prior.tolist()
    if which == "all":
        return list(range(len(flags)))
    want = which == "prior"
    return [i for i, f in enumerate(flags) if bool(f) == want]


def guided_target(target: torch.Tensor, base_empty: torch.Tensor, scale: float) -> torch.Tensor:
    """The target of the prompt's prediction when the loss is taken through classifier-free guidance.

    Sampling uses e(∅) + w (e(p) - e(∅)); asking that guided prediction to equal `target` with e(∅) the
    frozen base's gives e(p) = e(∅) + (target - e(∅)) / w. The squared error against this target is the
    guided prediction's error divided by w², so the loss keeps its scale; w = 1 gives `target` itself.
    """
    if scale == 1.0:
        return target
    base_empty = base_empty.to(target.dtype)
    return base_empty + (target - base_empty) / scale


def held_losses(
    student: torch.Tensor,
    base: torch.Tensor,
    s_plan: RowPlan,
    b_plan: RowPlan,
    index: Sequence[int],
    prompt: str,
) -> torch.Tensor:
    """Per-latent squared distance of the student's prediction for `prompt` from the base's: (len(index),)."""
    return per_sample_mse(student[s_plan.rows(index, prompt)], base[b_plan.rows(index, prompt)])
