"""Pure diffusion-training math: timesteps, noising targets, per-sample losses and their weights."""

from __future__ import annotations

import torch


def sample_timesteps(
    n: int, num_train_timesteps: int, generator: torch.Generator | list[torch.Generator], device
) -> torch.Tensor:
    """Uniform integer timesteps in [0, T), one per sample: (N,) long.

    With a list of N generators, sample i draws from generator i (as diffusers' randn_tensor does).
    """
    if isinstance(generator, list):
        return torch.cat(
            [torch.randint(0, num_train_timesteps, (1,), generator=g, device=device) for g in generator]
        )
    return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device)


def training_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict, as the scheduler's `prediction_type` says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample in fp32: (N, ...) x (N, ...) -> (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), for epsilon or v targets: (N,)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def instance_prior_loss(
    per_sample: torch.Tensor, is_prior: torch.Tensor, prior_loss_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth loss: mean over instance samples + weight * mean over prior samples.

    Returns (total, instance, prior); prior is 0 when the batch has no prior samples.
    """
    instance = per_sample[~is_prior].mean()
    if bool(is_prior.any()):
        prior = per_sample[is_prior].mean()
    else:
        prior = per_sample.new_zeros(())
    return instance + prior_loss_weight * prior, instance, prior
