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


def check_hold_arguments(
    hold_weight: float,
    hold_prompts: Sequence[str],
    hold_latents: str,
    uncond_latents: str,
    class_prompt: str | None,
    placeholder_tokens: Sequence[str],
    instance_guidance_scale: float,
    instance_guidance_anchor: str,
    ema_decay: float,
) -> None:
    """Raise ValueError naming the --model.* flag when the hold, guidance or averaging arguments are bad."""
    if hold_weight < 0:
        raise ValueError(f"--model.hold_weight must be >= 0, got {hold_weight}")
    if hold_latents not in HOLD_LATENTS:
        raise ValueError(f"--model.hold_latents must be one of {', '.join(HOLD_LATENTS)}, got {hold_latents!r}")
    if uncond_latents not in HOLD_LATENTS:
        raise ValueError(
            f"--model.uncond_latents must be one of {', '.join(HOLD_LATENTS)}, got {uncond_latents!r}"
        )
    if hold_weight > 0 and not class_prompt and not hold_prompts:
        raise ValueError(
            "--model.hold_weight needs a prompt to hold: set --data.class_prompt or --model.hold_prompts"
        )
    held_tokens = [p for p in hold_prompts if any(t in p for t in placeholder_tokens)]
    if held_tokens:
        raise ValueError(f"--model.hold_prompts must not contain placeholder tokens: {held_tokens[0]!r}")
    if instance_guidance_anchor not in ("empty", "class"):
        raise ValueError(
            f"--model.instance_guidance_anchor must be empty or class, got {instance_guidance_anchor!r}"
        )
    if instance_guidance_anchor == "class" and instance_guidance_scale != 1 and not class_prompt:
        raise ValueError("--model.instance_guidance_anchor class needs --data.class_prompt")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"--model.ema_decay must be in [0, 1), got {ema_decay}")
    if instance_guidance_scale < 1:
        raise ValueError(f"--model.instance_guidance_scale must be >= 1, got {instance_guidance_scale}")
