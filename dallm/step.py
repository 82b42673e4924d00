"""One training step's loss terms: the noisy latents, the batched UNet calls of the student and the base.

The rows each call predicts and the loss math are dallm.objective's; this module runs them on a
DallmModule (its VAE, latent cache, text encoder, UNet with LoRA, noise scheduler). One batched call of
the student with gradients, one batched no-grad call of the frozen base (adapters off), whatever terms
are on.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from dallm import diffusion
from dallm.cache import encode_each
from dallm.objective import RowPlan, guided_target, held_losses, hold_index


def held_prompts(hp) -> list[str]:
    """Prompts the base-prediction term holds: the class prompt, then --model.hold_prompts (hparams `hp`)."""
    if not hp.get("hold_weight", 0.0):
        return []
    class_prompt = [hp.class_prompt] if hp.get("class_prompt") else []
    return list(dict.fromkeys(class_prompt + list(hp.hold_prompts)))


def noised(module, batch: dict, generator) -> tuple[torch.Tensor, ...]:
    """The batch's latents (sampled from the VAE posterior), diffusion noise, timesteps and noisy latents.

    Drawn from `generator` in a fixed order: latent, noise, timesteps, then the noise offset if any.
    """
    pixels = batch["pixel_values"].to(module.device, module.vae.dtype)  # (N, 3, H, W)
    with torch.no_grad():
        encode = lambda x: module.vae.encode(x).latent_dist.parameters  # noqa: E731
        if module.latent_cache is not None and "keys" in batch:
            params = module.latent_cache.latent_params(batch["keys"], pixels, encode)
        else:
            params = encode_each(encode, pixels)  # as the cache does: the same latents either way
        dist = DiagonalGaussianDistribution(params.to(module.vae.dtype))  # (N, 2C, h, w)
        latents = dist.sample(generator=generator) * module.vae.config.scaling_factor  # (N, 4, H/8, W/8)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = diffusion.sample_timesteps(
        latents.shape[0], module.noise_scheduler.config.num_train_timesteps, generator, latents.device
    )
    if module.hparams.noise_offset > 0:
        # Drawn after the timesteps, so runs without an offset keep their noise and timesteps.
        offset = randn_tensor(
            (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )  # (N, 4, 1, 1)
        noise = noise + module.hparams.noise_offset * offset
    noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
    return latents, noise, timesteps, noisy


def step_losses(
    module, batch: dict, generator: torch.Generator | list[torch.Generator], uncond: bool, plain: bool = False
) -> dict[str, torch.Tensor]:
    """Per-sample losses of one step, each (rows,), the same min-SNR weighting for all:

    - "diffusion" (N,): each sample's denoising loss (through guidance for the instance samples when
      --model.instance_guidance_scale > 1);
    - "uncond" (N,), with `uncond`: the model's empty-prompt prediction vs the frozen base's;
    - "hold" (held prompts x latents,), with --model.hold_weight: the held prompts' predictions vs the
      frozen base's (dallm.objective).

    All are 0 while the LoRA is the identity, except "diffusion". The student's rows go through the
    UNet in one batched call, the base's in one no-grad call with the adapters off. `plain`: the
    diffusion loss alone, as the validation loss measures it (no held prompts, no guidance).
    """
    hp = module.hparams
    latents, noise, timesteps, noisy = noised(module, batch, generator)
    n = latents.shape[0]
    everything = list(range(n))
    is_prior = batch.get("is_prior", torch.zeros(n, dtype=torch.bool)).bool().cpu()
    instance = [i for i in everything if not is_prior[i]]
    guidance = 1.0 if plain else float(hp.get("instance_guidance_scale", 1.0))
    held = [] if plain else held_prompts(hp)
    student, base = RowPlan(), RowPlan()
    # The batch's own prompts first; a class image's row only when its loss counts (prior weight > 0).
    main = everything if plain or hp.prior_loss_weight > 0 else instance
    student.add(main, [batch["prompts"][i] for i in main])
    uncond_at = hold_index(is_prior, hp.get("uncond_latents", "all")) if uncond else []
    uncond = bool(uncond_at)
    if uncond:
        student.add(uncond_at, "")
        base.add(uncond_at, "")
    hold_at = hold_index(is_prior, hp.get("hold_latents", "all")) if held else []
    held = held if hold_at else []
    for prompt in held:  # a class image's class-prompt row is its own row: no extra student pass
        student.add(hold_at, prompt)
        base.add(hold_at, prompt)
    anchor = "" if hp.get("instance_guidance_anchor", "empty") == "empty" else hp.class_prompt
    if guidance != 1.0:
        base.add(instance, anchor)

    def predict(plan: RowPlan) -> torch.Tensor:
        idx = plan.latents.to(module.device)
        ids = batch["time_ids"].to(module.device)[idx] if "time_ids" in batch else None  # SDXL's (rows, 6)
        return module.denoise(noisy[idx], timesteps[idx], plan.prompts, ids)

    # One batched pass of the student: the same cost as separate ones on a CPU, fewer launches on a GPU.
    pred_s = predict(student)
    pred_b = None
    if len(base):
        with torch.no_grad(), module.base_only():
            pred_b = predict(base)
    target = diffusion.training_target(module.noise_scheduler, latents, noise, timesteps)
    if guidance != 1.0 and instance:
        at = torch.tensor(instance, device=target.device)
        target = target.clone()
        target[at] = guided_target(target[at], pred_b[base.rows(instance, anchor).to(pred_b.device)], guidance)
    out = {"diffusion": target.new_zeros(n, dtype=torch.float32)}  # a skipped class image's loss: 0
    out["diffusion"][main] = diffusion.per_sample_mse(pred_s[: len(main)], target[main])
    weights = None
    if hp.snr_gamma is not None:
        weights = diffusion.min_snr_weights(module.noise_scheduler, timesteps, hp.snr_gamma)  # (N,)
        out["diffusion"] = out["diffusion"] * weights
    if uncond:
        out["uncond"] = held_losses(pred_s, pred_b, student, base, uncond_at, "")
        if weights is not None:
            out["uncond"] = out["uncond"] * weights[torch.tensor(uncond_at, device=weights.device)]
    if held:
        rows = [held_losses(pred_s, pred_b, student, base, hold_at, p) for p in held]
        hold = torch.cat(rows)  # (prompts x latents,)
        if weights is not None:
            hold = hold * weights[torch.tensor(hold_at, device=weights.device)].repeat(len(held))
        out["hold"] = hold
    return out

