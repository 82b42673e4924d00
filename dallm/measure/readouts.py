"""Readouts a person would agree with; they judge a run and never enter its loss.

- `toy/*`: what the toy feature net's own heads see in a KID round's samples, for the instance and the
  class prompt: the share classified as the teacher's world, the share classified as circles (the toy
  teacher's subject), and the total-variation distance of the colour head's histogram from that of the
  base model's class images (0: the same mix of colours; 1: none in common).
- `drift/*`: paired drift, which needs no sampling and works at any scale: the mean squared difference of
  the trained model's noise prediction from the frozen base's (adapters off) at fixed (latent, timestep,
  noise) triples, for the class prompt (`drift/class`) and for prompts the run never trains on
  (`drift/other`, their mean); `drift/*_guided` the same for the classifier-free-guided prediction at the
  sampling scale, which is what the samples follow. 0 while the LoRA is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DRIFT_LATENTS = 8  # fixed triples per prompt: one batched UNet call each, negligible beside a KID round
TEACHER_WORLD = (
    1  # the toy net's world head: 0 the base's world, 1 the teacher's (scripts/make_toy_assets.py)
)
CIRCLE = 0  # index of "circle" in dallm.toy.world.SHAPES, the toy teacher's subject


# ---------------------------------------------------------------------------------------- toy heads
def head_classes(net, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Class index (N,) of each toy head for (N, D) L2-normalised toy features (the KID features)."""
    logits = net.heads_of(features.to(next(net.parameters()).device))
    return {name: value.argmax(1).cpu() for name, value in logits.items()}


def histogram(classes: torch.Tensor, n: int) -> torch.Tensor:
    """Share of each class among (N,) class indices: (n,) summing to 1."""
    return torch.bincount(classes, minlength=n).double() / max(len(classes), 1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance of two histograms: half the L1 distance, in [0, 1]."""
    return float(0.5 * (p - q).abs().sum())


def toy_shares(
    net, features: torch.Tensor, base_colours: torch.Tensor | None, prefix: str
) -> dict[str, float]:
    """`toy/<prefix>_teacher_world`, `toy/<prefix>_circle`, `toy/<prefix>_colour_tv` of (N, D) toy features.

    `base_colours` is the colour histogram of the base model's class images (`colour_histogram`); without
    it there is no colour distance.
    """
    classes = head_classes(net, features)
    out = {
        f"toy/{prefix}_teacher_world": float((classes["world"] == TEACHER_WORLD).double().mean()),
        f"toy/{prefix}_circle": float((classes["shape"] == CIRCLE).double().mean()),
    }
    if base_colours is not None:
        colours = histogram(classes["colour"], len(base_colours))
        out[f"toy/{prefix}_colour_tv"] = total_variation(colours, base_colours)
    return out


def colour_histogram(net, features: torch.Tensor) -> torch.Tensor:
    """The toy colour head's histogram over (N, D) toy features: (colours,)."""
    return histogram(head_classes(net, features)["colour"], net.heads["colour"].out_features)


# ---------------------------------------------------------------------------------------- drift
def drift_fixture(
    latents: torch.Tensor, num_train_timesteps: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed (latents, timesteps, noise) for paired drift: (K, C, h, w), (K,), (K, C, h, w).

    The timesteps spread evenly over [0, T) so that early and late denoising both count; the noise comes
    from its own generator (`seed`), never the run's.
    """
    k = latents.shape[0]
    timesteps = torch.linspace(0, num_train_timesteps - 1, k + 2)[1:-1].round().long()  # (K,)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g, dtype=torch.float32).to(latents.dtype)
    return latents, timesteps, noise


@torch.no_grad()
def encode_fixture(module, paths: Sequence, resolution: int, seed: int) -> tuple[torch.Tensor, ...]:
    """`drift_fixture` on the VAE latents (the posterior means: no sampling) of the images in `paths`."""
    from dallm.measure.kid import images_to_tensor

    pixels = images_to_tensor(list(paths), size=resolution).to(module.device, module.vae.dtype) * 2 - 1
    # One image at a time, as the training cache encodes (a batched conv may sum in another order).
    means = torch.cat([module.vae.encode(x[None]).latent_dist.mean for x in pixels])
    latents = means * module.vae.config.scaling_factor  # (K, C, h, w)
    return drift_fixture(latents, module.noise_scheduler.config.num_train_timesteps, seed)


@torch.no_grad()
def paired_drift(
    module, fixture: tuple[torch.Tensor, ...], base: dict, prompts: Sequence[str], guidance: float = 1.0
) -> tuple[dict[str, float], dict[str, float]]:
    """Paired drift of each prompt: ({prompt: plain}, {prompt: guided}).

    Plain: the mean squared difference of `module`'s noise prediction from the base's. Guided: the same for
    the classifier-free-guided prediction e(∅) + w (e(p) - e(∅)) the sampler uses at `guidance` w, each
    model with its own e(∅) ({} when w is 1): the plain drift of a prompt says little when the empty
    prompt moves with it, guidance multiplies their difference. `base` caches the frozen base's
    predictions by prompt (the base never changes). The UNet runs in eval mode (no LoRA dropout) and is
    put back as it was.
    """
    latents, timesteps, noise = (t.to(module.device) for t in fixture)
    noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
    asked = list(dict.fromkeys([*prompts, *([""] if guidance != 1.0 else [])]))
    was_training = module.training
    module.eval()
    try:
        pred = {}
        for prompt in asked:
            pred[prompt] = module.denoise(noisy, timesteps, [prompt] * len(latents), cache=False).float()
            if prompt not in base:
                with module.base_only():
                    base[prompt] = module.denoise(noisy, timesteps, [prompt] * len(latents), cache=False).float()
    finally:
        module.train(was_training)
    plain = {p: float((pred[p] - base[p]).pow(2).mean()) for p in prompts}
    guided = {}
    if guidance != 1.0:
        for p in prompts:
            g_model = pred[""] + guidance * (pred[p] - pred[""])
            g_base = base[""] + guidance * (base[p] - base[""])
            guided[p] = float((g_model - g_base).pow(2).mean())
    return plain, guided


def drift_metrics(
    plain: dict[str, float], guided: dict[str, float], class_prompt: str | None
) -> dict[str, float]:
    """`drift/class`, `drift/other` (the mean over the other prompts) and, from the guided drift,
    `drift/class_guided` and `drift/other_guided`."""
    out = {}
    for suffix, values in (("", plain), ("_guided", guided)):
        if class_prompt is not None and class_prompt in values:
            out[f"drift/class{suffix}"] = values[class_prompt]
        others = [v for p, v in values.items() if p != class_prompt]
        if others:
            out[f"drift/other{suffix}"] = sum(others) / len(others)
    return out


# ---------------------------------------------------------------------------------------- summary
# ---------------------------------------------------------------------------------------- one KID round
class RoundReadouts:
    """The readouts of each KID round of dallm.measure.callback.KIDCallback: the toy heads' shares of the round's
    samples and the paired drift. The drift's fixed triples and the base's predictions are made at the
    first round and kept (the base never changes)."""

    def __init__(self, drift_prompts: Sequence[str]) -> None:
        self.drift_prompts = list(drift_prompts)
        self._drift: tuple | None = None  # fixed (latent, timestep, noise) triples and the base's predictions

    def __call__(self, trainer, pl_module, kid, ref: dict, shown: dict[str, torch.Tensor]) -> dict[str, float]:
        """`toy/<name>_*` for each set of sample features in `shown` when `kid` (the KIDCallback) measures
        with the toy net, the colours against the class images' (`ref["prior"]`); then `drift/*` (the
        fixture's noise from the KID seed, `drift/*_guided` at its guidance scale)."""
        out: dict[str, float] = {}
        if kid.feature == "toy":  # the net's own heads judge what the samples show
            net = kid._extractor.net
            base_colours = colour_histogram(net, ref["prior"]) if "prior" in ref else None
            for name, features in shown.items():
                out.update(toy_shares(net, features, base_colours, name))
        return out | self.drift(trainer, pl_module, kid.seed, kid.guidance_scale)

    def drift(self, trainer, pl_module, seed: int, guidance: float) -> dict[str, float]:
        """`drift/class` and `drift/other` (paired_drift) on the first class images' latents."""
        dm = trainer.datamodule
        class_prompt = dm.hparams.class_prompt
        prompts = ([class_prompt] if class_prompt else []) + [p for p in self.drift_prompts if p != class_prompt]
        paths = (dm.prior_paths or dm.val_teacher_paths)[:DRIFT_LATENTS]
        if not prompts or not paths:
            return {}
        if self._drift is None:
            self._drift = (encode_fixture(pl_module, paths, dm.hparams.resolution, seed), {})
        plain, guided = paired_drift(pl_module, *self._drift, prompts, guidance)
        return drift_metrics(plain, guided, class_prompt)


def summary_line(entry: dict[str, float]) -> str | None:
    """The end-of-run line of readouts from a KID round's entry, or None when it has none."""
    parts = []
    for prefix, name in (("instance", "instance"), ("class", "class")):
        world = entry.get(f"toy/{prefix}_teacher_world")
        if world is None:
            continue
        text = f"{name}: {100 * world:.0f}% teacher world, {100 * entry[f'toy/{prefix}_circle']:.0f}% circles"
        tv = entry.get(f"toy/{prefix}_colour_tv")
        parts.append(text + (f", colour TV {tv:.2f}" if tv is not None else ""))
    for key in ("kid/prior", "drift/class", "drift/class_guided", "drift/other"):
        if key in entry:
            parts.append(f"{key} {entry[key]:.4g}")
    return "; ".join(parts) if parts else None
