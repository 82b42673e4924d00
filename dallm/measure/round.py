"""One KID round of a training run: sample fixed seeds with their own generators, extract features, score.

`KIDRound` holds the round's settings (the `--kid.*` flags, documented in its `__init__`), its feature
extractor and the teacher features it computes once; `dallm.measure.callback.KIDCallback` runs it from
Lightning's hooks, logs it and keeps its history.
"""

from __future__ import annotations

from contextlib import contextmanager

import lightning.pytorch as pl
import torch

from dallm.base import vae_roundtrip
from dallm.measure import readouts
from dallm.measure.feature_spec import FeatureSpec, canonical_feature, feature_name
from dallm.ranges import AtLeastTwo, Count, NonNegativeFinite, NonNegativeInt, Seed


def gather_rows(trainer: pl.Trainer, rows: torch.Tensor) -> torch.Tensor:
    """All-gather per-rank row blocks of unequal sizes into one (sum of sizes, ...) tensor, rank by rank."""
    if trainer.world_size == 1:
        return rows
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(rows))  # pads uneven blocks for the collective and trims them


@contextmanager
def own_rng(device: torch.device | None = None):
    """Run a block with the global generators forked: whatever it draws, the training stream is unchanged."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class KIDRound:
    """The settings and state of a run's KID rounds, and the round itself (`score`)."""

    def __init__(
        self,
        every_n_steps: NonNegativeInt = 250,
        num_samples: AtLeastTwo = 20,
        feature: FeatureSpec = "inception",
        weights: str | None = None,
        subset_size: AtLeastTwo = 1000,
        subsets: Count = 100,
        num_inference_steps: Count = 25,
        guidance_scale: NonNegativeFinite = 7.5,
        scheduler: str = "dpm++",
        batch_size: Count = 10,
        seed: Seed | None = None,
        feature_batch_size: Count = 32,
        drift_prompts: list[str] = ["a photo of a dog", "a city street at night", "a bowl of fruit on a table"],  # noqa: B006
    ) -> None:
        """
        Args:
            every_n_steps: KID round every this many optimizer steps (plus step 0 and the end); 0 turns
                KID off.
            num_samples: images generated per prompt and round (the paper: as many as teacher images).
            feature: feature space: "inception" (torch-fidelity Inception-v3), "clip:<hub id or dir>" (also
                logs CMMD), "toy", or any nn.Module class mapping images to (N, D) features as
                {class_path: <package.module.Class>, init_args: {...}}.
            weights: local Inception weights file (else $DALLM_INCEPTION_WEIGHTS or torch-fidelity's download).
            subset_size: KID subset size; capped at the sample sizes (with one subset when it is both).
            subsets: number of KID subsets.
            num_inference_steps: sampler steps per image.
            guidance_scale: classifier-free guidance scale.
            scheduler: sampler: "dpm++" (DPM-Solver++ multistep), "ddim", or "model" (the base model's own).
            batch_size: images generated per pipeline call.
            seed: first sampling seed; image i uses seed + i, the same at every round. Default: the run's
                --seed_everything (0 outside the CLI).
            feature_batch_size: images per feature-extractor call.
            drift_prompts: prompts the run never trains on, for `drift/other` (dallm.measure.readouts); [] for none.
        """
        if every_n_steps < 0:
            raise ValueError(f"--kid.every_n_steps must be >= 0, got {every_n_steps}")
        if num_samples < 2:
            raise ValueError(f"--kid.num_samples must be >= 2 (KID needs two samples), got {num_samples}")
        if scheduler not in ("dpm++", "ddim", "model"):
            raise ValueError(f"--kid.scheduler must be dpm++, ddim or model, got {scheduler!r}")
        if batch_size < 1 or feature_batch_size < 1:
            raise ValueError("--kid.batch_size and --kid.feature_batch_size must be >= 1")
        if subset_size < 2:  # checked now, not at the first KID round after class images and model loading
            raise ValueError(f"--kid.subset_size must be >= 2 (KID compares pairs), got {subset_size}")
        if subsets < 1:
            raise ValueError(f"--kid.subsets must be >= 1, got {subsets}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.feature = canonical_feature(feature)  # a name, or a plain {class_path, init_args}
        self.weights = weights
        self.subset_size = subset_size
        self.subsets = subsets
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.seed = 0 if seed is None else seed
        self.feature_batch_size = feature_batch_size
        self.drift_prompts = list(drift_prompts)  # read by the resume contract (dallm.contract)
        self.readouts = readouts.RoundReadouts(drift_prompts)  # toy/* and drift/*
        self.history: list[dict] = []  # one entry per round; saved in checkpoints, so resume continues
        self._extractor = None
        self._reference: dict[str, torch.Tensor] = {}
        self._noted: set[str] = set()

    def features(self, images: torch.Tensor, device) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> (N, D) fp32 features, on the CPU."""
        from dallm.measure.kid import features_of_images

        self._extractor.to(device)
        return features_of_images(images, self._extractor, self.feature_batch_size).float().cpu()

    def teacher_features(self, trainer, pl_module) -> dict[str, torch.Tensor]:
        """Features of the teacher (train, val) and class images, computed once per fit."""
        if self._reference:
            return self._reference
        from dallm.measure.kid import features_of_paths

        dm = trainer.datamodule
        sets = {"train": dm.train_teacher_paths, "val": dm.val_teacher_paths}
        if dm.with_prior_preservation:
            sets["prior"] = dm.prior_paths
        self._extractor.to(pl_module.device)
        for name, paths in sets.items():
            if len(paths) >= 2:  # each file decoded and resized on its own, as the extractor expects
                feats = features_of_paths(paths, self._extractor, self.feature_batch_size)
                self._reference[name] = feats.float().cpu()
        return self._reference

    def samples(self, trainer, pl_module, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-seed samples for `prompt` and their features: ((N, 3, H, W) in [0, 1], (N, D)), on CPU.

        Under DDP each rank generates and embeds its share of the seeds; images and features are then
        gathered, so every rank holds the same full set in seed order.
        """
        from dallm.base import make_scheduler  # the sampler `dallm sample` builds from the same name

        world, rank = trainer.world_size, trainer.global_rank
        res = trainer.datamodule.hparams.resolution
        seeds = list(range(self.seed, self.seed + self.num_samples))
        mine = seeds[rank::world]
        out = []
        for i in range(0, len(mine), self.batch_size):
            batch = pl_module.generate(
                prompt,
                mine[i : i + self.batch_size],
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                resolution=res,
                scheduler=make_scheduler(self.scheduler, pl_module.noise_scheduler.config),
                output_type="pt",
            )
            # uint8, as the images would be saved: the features see what a PNG would hold.
            out.append((batch.float().clamp(0, 1) * 255).round().to(torch.uint8))
        images = torch.cat(out) if out else torch.zeros(0, 3, res, res, dtype=torch.uint8)
        feats = self.features(images.float() / 255, pl_module.device)  # (n_mine, D)
        images = gather_rows(trainer, images.to(pl_module.device)).cpu()
        feats = gather_rows(trainer, feats.to(pl_module.device)).cpu()
        # Back to seed order (rank r holds seeds r, r + W, ...).
        order = [s for r in range(world) for s in seeds[r::world]]
        index = torch.tensor([order.index(s) for s in seeds])
        return images[index].float() / 255, feats[index]

    def reference_metrics(self, pl_module, ref: dict[str, torch.Tensor], trainer) -> dict[str, float]:
        """KID train-vs-val teacher images, and held-out teachers vs their VAE reconstructions."""
        from dallm.measure.kid import images_to_tensor

        out = {}
        if "train" in ref and "val" in ref:
            out["kid/reference"] = self.kid(ref["val"], ref["train"]).kid_mean
        if "val" in ref:
            real = images_to_tensor(
                trainer.datamodule.val_teacher_paths, size=trainer.datamodule.hparams.resolution
            )
            recon = vae_roundtrip(pl_module.vae, real)
            out["kid/val_floor"] = self.kid(ref["val"], self.features(recon, pl_module.device)).kid_mean
        return out

    def kid(self, real: torch.Tensor, fake: torch.Tensor):
        from dallm.measure.kid import kid_from_features

        return kid_from_features(
            real, fake, subset_size=self.subset_size, subsets=self.subsets, seed=self.seed
        )

    def score(self, trainer, pl_module) -> tuple[dict[str, float], set[str], list[torch.Tensor]]:
        """Sample, extract and score: (the round's metrics, its notes, the sample grid's rows).

        The caller runs it on forked generators (`own_rng`): scoring never changes what is trained.
        """
        import time

        from dallm.measure.kid import cmmd_from_features

        start = time.perf_counter()
        ref = self.teacher_features(trainer, pl_module)
        metrics: dict[str, float] = {}
        notes = set()
        images, fake = self.samples(trainer, pl_module, pl_module.hparams.instance_prompt)
        for name in ("train", "val"):
            if name in ref:
                result = self.kid(ref[name], fake)
                metrics[f"kid/{name}"] = result.kid_mean
                if result.kid_se is not None:
                    metrics[f"kid/{name}_se"] = result.kid_se
                if result.note:
                    notes.add(f"kid/{name}: {result.note}")
                if feature_name(self.feature).startswith("clip:"):
                    metrics[f"cmmd/{name}"] = cmmd_from_features(ref[name], fake)
        grid_rows, shown = [images], {"instance": fake}
        class_prompt = trainer.datamodule.hparams.class_prompt
        if "prior" in ref and class_prompt:
            prior_images, prior_fake = self.samples(trainer, pl_module, class_prompt)
            prior = self.kid(ref["prior"], prior_fake)
            metrics["kid/prior"] = prior.kid_mean
            if prior.kid_se is not None:
                metrics["kid/prior_se"] = prior.kid_se
            if feature_name(self.feature).startswith("clip:"):
                metrics["cmmd/prior"] = cmmd_from_features(ref["prior"], prior_fake)
            grid_rows.append(prior_images)
            shown["class"] = prior_fake
        metrics.update(self.readouts(trainer, pl_module, self, ref, shown))
        if not self.history:
            metrics.update(self.reference_metrics(pl_module, ref, trainer))
        metrics["kid/round_seconds"] = time.perf_counter() - start
        return metrics, notes, grid_rows


def format_metrics(metrics: dict[str, float]) -> str:
    """`kid/val 0.0113 ± 0.0040, ...`: each value with its standard error where it has one."""
    shown = []
    for key, value in metrics.items():
        if key.endswith("_se"):
            continue
        se = metrics.get(f"{key}_se")
        shown.append(f"{key} {value:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
    return ", ".join(shown)

