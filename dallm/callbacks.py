"""Lightning callbacks of dallm."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

from dallm.base import vae_roundtrip
from dallm.ema import looked_at
from dallm.measure import readouts
from dallm.ranges import AtLeastTwo, Count, NonNegativeFinite, NonNegativeInt, Seed


def run_dir(trainer: pl.Trainer) -> Path:
    """The run directory: the logger's version dir (lightning_logs/<name>/version_k), else default_root_dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class LoraExport(pl.Callback):
    """Export the LoRA + token embeddings at every checkpoint and at the end of training, in every format.

    Writes `<run dir>/lora/step=NNNNNN/` (diffusers files, the kohya file, the run's embedding, a model card;
    see `dallm.export.formats`), refreshes `<run dir>/lora/last/`, and refreshes `<run dir>/lora/best/` whenever the
    best-KID checkpoint (`checkpoints/best.ckpt`, a ModelCheckpoint monitoring kid/val) is saved. Global rank
    0 writes.
    """

    def __init__(self, enabled: bool = True, formats: list[str] = ["diffusers", "kohya"]) -> None:  # noqa: B006
        """
        Args:
            enabled: export at every checkpoint and at the end of fit.
            formats: export formats: diffusers (load_lora_weights + token files), kohya (for A1111, Forge,
                ComfyUI and kohya, beside the run's embedding file), a1111 (the embedding bundled inside).
        """
        from dallm.export.formats import check_formats

        self.enabled = enabled
        self.formats = check_formats(list(formats), "--export.formats")
        self._exported_step: int | None = None
        self._best_score: float | None = None
        self.run_info: dict = {}  # facts of the run for the kohya metadata and model card; saved in checkpoints

    def state_dict(self) -> dict:
        return {"run_info": self.run_info}

    def load_state_dict(self, state_dict: dict) -> None:
        self.run_info = dict(state_dict.get("run_info") or {})

    def on_train_start(self, trainer, pl_module) -> None:
        from dallm.export.formats import run_name

        dm = trainer.datamodule
        hp = getattr(dm, "hparams", {})
        lr = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        self.run_info = {
            "name": run_name(run_dir(trainer)),
            "num_train_images": len(getattr(dm, "train_teacher_paths", []) or []),
            "num_val_images": len(getattr(dm, "val_teacher_paths", []) or []),
            "num_reg_images": len(getattr(dm, "prior_paths", []) or []),
            "resolution": hp.get("resolution"),
            "learning_rate": lr.get("initial_lr", lr.get("lr")),
            "seed": pl_module.hparams.get("seed"),
            "max_steps": trainer.max_steps,
            "prior_loss_weight": pl_module.hparams.get("prior_loss_weight"),
            "noise_offset": pl_module.hparams.get("noise_offset"),
        }
        best = best_checkpoint_callback(trainer)
        # After a resume the restored best is already exported: only a new best is written.
        self._best_score = _score(best.best_model_score) if best is not None else None

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        from dallm.export.formats import copy_export, write_exports

        step = trainer.global_step
        if not self.enabled or self._exported_step == step:
            return None
        # trainer.log_dir is a collective under DDP: every rank asks (once), only rank 0 writes.
        run = run_dir(trainer)
        root = run / "lora"
        self._exported_step = step
        if not trainer.is_global_zero:
            return None
        kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
        formats = self.formats
        if pl_module.hparams.get("use_dora") and {"kohya", "a1111"} & set(formats):
            formats = [f for f in formats if f not in ("kohya", "a1111")] or ["diffusers"]
            if not getattr(self, "_dora_noted", False):
                rank_zero_info("dallm: DoRA has no exact kohya form; exporting the diffusers format only")
                self._dora_noted = True
        with looked_at(pl_module):  # the weight average, with --model.ema_decay
            out = write_exports(
                pl_module,
                root / f"step={step:06d}",
                step,
                formats,
                self.run_info,
                kid.history if kid is not None else [],
                run / "samples",
            )
        copy_export(out, root / "last")
        return out

    def export_best(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refresh lora/best when the best-KID checkpoint has just taken a new best (it is being saved now)."""
        from dallm.export.formats import copy_export

        best = best_checkpoint_callback(trainer)
        score = _score(best.best_model_score) if best is not None else None
        if not self.enabled or score is None or score == self._best_score:
            return
        self._best_score = score
        root = run_dir(trainer) / "lora"
        self.export(trainer, pl_module)  # this step's export, if not written yet
        if trainer.is_global_zero:
            copy_export(root / f"step={trainer.global_step:06d}", root / "best")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.export(trainer, pl_module)
        self.export_best(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        out = self.export(trainer, pl_module)
        if out is not None:
            rank_zero_info(f"dallm: LoRA exported to {out} and {out.parent / 'last'}")


def _score(value) -> float | None:
    return None if value is None else float(value)


def best_checkpoint(every_n_steps: int) -> ModelCheckpoint:
    """Lightning's ModelCheckpoint keeping `checkpoints/best.ckpt` at the lowest kid/val (ties: the earlier step).

    It looks at kid/val on the KID rounds' steps (`--kid.every_n_steps`; the round runs first and puts its
    numbers in `trainer.callback_metrics`); rounds off that grid (step 0, an odd final step) are not candidates.
    """
    return ModelCheckpoint(
        monitor="kid/val",
        mode="min",  # strict "<": an equal later KID keeps the earlier step
        save_top_k=1 if every_n_steps > 0 else 0,
        filename="best",
        auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps,
        enable_version_counter=False,
        # Decide at the round's own step: never defer to a validation end that may not come (the last batch).
        save_on_train_epoch_end=True,
    )


def best_checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The best-KID ModelCheckpoint among the trainer's callbacks, if any."""
    return next(
        (cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor == "kid/val"), None
    )


class KIDEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping on kid/val, checked right after each KID round: patience counts KID rounds.

    Not at validation ends (Lightning's default), where kid/val would be a stale value from an older round.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"--early_stopping.patience must be >= 1, got {patience}")
        super().__init__(monitor="kid/val", mode="min", patience=patience, check_on_train_epoch_end=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
        fresh = kid is not None and kid.history and kid.history[-1]["step"] == trainer.global_step
        if fresh and trainer.global_step > 0 and "kid/val" in kid.history[-1]:
            self._run_early_stopping_check(trainer)


class StepProgressBar(RichProgressBar):
    """Rich progress bar counting the run's optimizer steps (`step 120/250`): one epoch here is the whole run."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_steps(trainer)

    def _show_steps(self, trainer) -> None:
        if self.progress is None or self.train_progress_bar_id is None or trainer.max_steps <= 0:
            return
        step, total = trainer.global_step, trainer.max_steps
        self.progress.update(self.train_progress_bar_id, completed=step, total=total, description=f"step {step}/{total}")


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


class KIDCallback(pl.Callback):
    """Kernel Inception Distance of the model's samples to the teacher images while it trains.

    At step 0 (the base model), every `every_n_steps` and at the end, it samples `num_samples` images
    with fixed seeds for the instance prompt and logs `kid/train` (against the teacher images trained
    on), `kid/val` (against held-out teacher images), `kid/prior` (class-prompt samples against the base
    model's class images, i.e. forgetting), each with its standard error (`kid/val_se`, ...: over draws of
    the two samples, not over the choice of sampling seeds) and, with CLIP features, `cmmd/*`. Once, at
    the first round, it also logs two references: `kid/reference` (train vs held-out teacher images: what
    "no difference" looks like at this sample size) and `kid/val_floor` (held-out teacher images vs their
    own VAE reconstructions: the best any fine-tuning of this UNet can reach).
    Teacher features are computed once; a grid of the samples goes to TensorBoard (`samples`) and to
    `<run dir>/samples/step=NNNNNN.png`. Under DDP every rank samples its share of the seeds.
    """

    def __init__(
        self,
        every_n_steps: NonNegativeInt = 250,
        num_samples: AtLeastTwo = 20,
        feature: str = "inception",
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
                logs CMMD), "toy", or "module:<python.path:callable>".
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
        self.feature = feature
        self.weights = weights
        self.subset_size = subset_size
        self.subsets = subsets
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.seed = 0 if seed is None else seed
        self.feature_batch_size = feature_batch_size
        self.drift_prompts = list(drift_prompts)  # the resume contract records it (dallm.contract)
        self.readouts = readouts.RoundReadouts(drift_prompts)  # toy/* and drift/*
        self.history: list[dict] = []  # one entry per round; saved in checkpoints, so resume continues
        self._extractor = None
        self._reference: dict[str, torch.Tensor] = {}
        self._noted: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    # ---------------------------------------------------------------- state across resume
    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def done_steps(self) -> set[int]:
        return {h["step"] for h in self.history}

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        from dallm.measure.kid import build_feature_extractor

        # Build now so a bad --kid.feature or missing weights fails before any training; a feature net that
        # initialises randomly draws from a forked generator, not the run's.
        try:
            with own_rng():
                self._extractor = build_feature_extractor(self.feature, weights=self.weights, device="cpu")
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"--kid.feature {self.feature!r}: {err}") from err

    def due(self, trainer, step: int) -> bool:
        """Whether `step` is a scheduled round: 0, every `every_n_steps`, and the last step."""
        return step % self.every_n_steps == 0 or step >= trainer.max_steps > 0

    def on_train_start(self, trainer, pl_module) -> None:
        # The base model's round at step 0; a run resumed at a step that is not scheduled gets no extra
        # round (its curve must equal the uninterrupted run's), one resumed at a scheduled step that was
        # not scored yet gets it.
        step = trainer.global_step
        if self.enabled and self.due(trainer, step) and step not in self.done_steps():
            self.run_round(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        step = trainer.global_step
        # The final round runs here too, before ModelCheckpoint's save of the same step, so that
        # last.ckpt holds it and a resumed run does not repeat it.
        if self.due(trainer, step) and step not in self.done_steps():
            self.run_round(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and trainer.global_step not in self.done_steps():
            self.run_round(trainer, pl_module)

    # ---------------------------------------------------------------- the round
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

    def run_round(self, trainer, pl_module) -> None:
        """One KID round on forked generators: scoring never changes what is trained."""
        step = trainer.global_step
        bad = pl_module.nonfinite_parameters() if hasattr(pl_module, "nonfinite_parameters") else []
        if bad:
            # Samples of a diverged model are noise or black; a KID of them would look plausible.
            rank_zero_info(f"dallm: step {step}: no KID round: {len(bad)} trainable tensors are non-finite")
            return
        with own_rng(pl_module.device), looked_at(pl_module):  # the weight average, with --model.ema_decay
            self._run_round(trainer, pl_module, step)

    def _run_round(self, trainer, pl_module, step: int) -> None:
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
                if self.feature.startswith("clip:"):
                    metrics[f"cmmd/{name}"] = cmmd_from_features(ref[name], fake)
        grid_rows, shown = [images], {"instance": fake}
        class_prompt = trainer.datamodule.hparams.class_prompt
        if "prior" in ref and class_prompt:
            prior_images, prior_fake = self.samples(trainer, pl_module, class_prompt)
            prior = self.kid(ref["prior"], prior_fake)
            metrics["kid/prior"] = prior.kid_mean
            if prior.kid_se is not None:
                metrics["kid/prior_se"] = prior.kid_se
            if self.feature.startswith("clip:"):
                metrics["cmmd/prior"] = cmmd_from_features(ref["prior"], prior_fake)
            grid_rows.append(prior_images)
            shown["class"] = prior_fake
        metrics.update(self.readouts(trainer, pl_module, self, ref, shown))
        if not self.history:
            metrics.update(self.reference_metrics(pl_module, ref, trainer))
        metrics["kid/round_seconds"] = time.perf_counter() - start
        self.history.append({"step": step, **metrics})
        # This step's numbers, for the best-KID ModelCheckpoint and EarlyStopping (every rank: they all decide).
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})

        out_dir = run_dir(trainer) / "samples"  # a collective under DDP: all ranks ask
        if trainer.is_global_zero:
            self.write_grid(trainer, grid_rows, out_dir / f"step={step:06d}.png", step)
            if trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=step)
            rank_zero_info(f"dallm: step {step}: {format_metrics(metrics)}")
            for note in sorted(notes - self._noted):  # each note once per run, not every round
                rank_zero_info(f"  note: {note}")
            self._noted |= notes

    def write_grid(self, trainer, rows: list[torch.Tensor], path: Path, step: int) -> None:
        from torchvision.utils import make_grid, save_image

        per_row = rows[0].shape[0]
        grid = make_grid(torch.cat(rows), nrow=per_row, padding=1)  # one row per prompt
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, step)


def format_metrics(metrics: dict[str, float]) -> str:
    """`kid/val 0.0113 ± 0.0040, ...`: each value with its standard error where it has one."""
    shown = []
    for key, value in metrics.items():
        if key.endswith("_se"):
            continue
        se = metrics.get(f"{key}_se")
        shown.append(f"{key} {value:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
    return ", ".join(shown)


class HParamsLog(pl.Callback):
    """A run's settings and KID summary in TensorBoard's HParams tab, to compare the runs of a sweep.

    Params: rank, alpha, num_teacher_images, lr (LoRA), token_lr, max_steps, seed, base, teacher.
    Metrics (scalars, refreshed after every KID round): `hp/kid_val_start` (step 0), `hp/kid_val_best`,
    `hp/kid_val_last`, `hp/kid_val_last_se` (when the KID callback logs `kid/val_se`), `hp/kid_prior_last`.
    """

    METRICS = (
        "hp/kid_val_start",
        "hp/kid_val_best",
        "hp/kid_val_last",
        "hp/kid_val_last_se",
        "hp/kid_prior_last",
    )

    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: write the HParams summary (needs the TensorBoard logger).
        """
        self.enabled = enabled
        self._rounds_seen = -1

    @staticmethod
    def params(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float | str]:
        """The settings a sweep compares, read from the module, data module, optimizer and seed."""
        import os

        hp, dm = pl_module.hparams, trainer.datamodule
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        lr = next((g["lr"] for g in groups if g.get("name") == "lora"), groups[0]["lr"] if groups else None)
        return {
            "rank": hp.rank,
            "alpha": hp.alpha if hp.alpha is not None else hp.rank,
            "num_teacher_images": len(dm.train_teacher_paths) if dm is not None else None,
            "lr": lr,
            "token_lr": hp.token_lr,
            "max_steps": trainer.max_steps,
            # Lightning records --seed_everything here; the module's own seed is the fallback.
            "seed": int(os.environ.get("PL_GLOBAL_SEED", hp.seed)),
            "base": str(hp.pretrained_model_name_or_path),
            "teacher": str(dm.hparams.teacher_dir) if dm is not None else None,
        }

    def on_fit_start(self, trainer, pl_module) -> None:
        # Before Lightning's own log_hyperparams (same hook order in Trainer._run): TensorBoard keeps the
        # first session summary of a run, and Lightning's holds neither these names nor the KID metrics.
        from lightning.pytorch.loggers import TensorBoardLogger
        from torch.utils.tensorboard.summary import hparams

        if not (self.enabled and trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger)):
            return
        params = {k: v for k, v in self.params(trainer, pl_module).items() if v is not None}
        writer = trainer.logger.experiment._get_file_writer()  # as Lightning's log_hyperparams does
        for summary in hparams(params, dict.fromkeys(self.METRICS, 0.0)):
            writer.add_summary(summary)

    def metrics(self, history: list[dict]) -> dict[str, float]:
        """The HParams metrics from the KID rounds so far."""
        rounds = [h for h in history if "kid/val" in h]
        if not rounds:
            return {}
        out = {
            "hp/kid_val_start": rounds[0]["kid/val"],
            "hp/kid_val_best": min(h["kid/val"] for h in rounds),
            "hp/kid_val_last": rounds[-1]["kid/val"],
        }
        if "kid/val_se" in rounds[-1]:
            out["hp/kid_val_last_se"] = rounds[-1]["kid/val_se"]
        prior = [h for h in history if "kid/prior" in h]
        if prior:
            out["hp/kid_prior_last"] = prior[-1]["kid/prior"]
        return out

    def _update(self, trainer) -> None:
        kid = next((cb for cb in trainer.callbacks if isinstance(cb, KIDCallback)), None)
        if not self.enabled or kid is None or len(kid.history) == self._rounds_seen or trainer.logger is None:
            return
        self._rounds_seen = len(kid.history)
        values = self.metrics(kid.history)
        if values and trainer.is_global_zero:
            trainer.logger.log_metrics(values, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._update(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._update(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._update(trainer)
