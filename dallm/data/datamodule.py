"""The DataModule: teacher images (train / held-out split, prompts), prior-preservation class images, loaders.

What an example and a batch are is in `dallm.data.dataset`; the training order in `dallm.data.stream`; how a
class image is made in `dallm.teacher.pipeline` (the same filler as `dallm teacher --backend diffusers`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from dallm.base import load_base_pipeline, model_id
from dallm.data.dataset import TeacherPriorDataset, collate
from dallm.data.stream import StepDataLoader, StepSampler
from dallm.images import list_images
from dallm.manifest import lock_directory, manifest_path, read_manifest, remove_stale_temp_files, slot_name
from dallm.ranges import Count, NonNegativeFinite, NonNegativeInt, Resolution, Seed
from dallm.teacher.pipeline import fill_slots
from dallm.teacher.slots import DirFlags, Slot, scan

# Class-image directories are checked as teacher directories are, with the DataModule's flags in messages.
PRIOR_FLAGS = DirFlags(
    "--data.prior_dir",
    {
        "prompt": "--data.class_prompt",
        "model": "--model.pretrained_model_name_or_path",
        "steps": "--data.prior_generation_steps",
        "guidance_scale": "--data.prior_guidance_scale",
    },
    "choose another --data.prior_dir (mixing class images made with other settings would go unnoticed)",
    exclusive=False,  # only the slots are read, so other files there do no harm
)


class DallmDataModule(pl.LightningDataModule):
    """Teacher images (+ prior-preservation class images made by the base model) for LoRA alignment.

    Over 250 lines: a hundred of them are `__init__`, the `--data.*` flags with their documentation (the
    `--help`) and checks; the rest are Lightning's hooks (split, class images, setup, loaders) over helpers
    that live in `dataset`, `stream` and the teacher wing's `slots` and `pipeline`.
    """

    def __init__(
        self,
        teacher_dir: str,
        instance_prompt: str = "a realistic painting of a cat in baroque art style like <s1><s2>",
        num_teacher_images: Count | None = None,
        val_teacher_dir: str | None = None,
        num_val_images: NonNegativeInt = 0,
        class_prompt: str | None = None,
        prior_dir: str | None = None,
        num_prior_images: Count = 100,
        prior_generation_steps: Count = 25,
        prior_guidance_scale: NonNegativeFinite = 7.5,
        prior_batch_size: Count = 4,
        resolution: Resolution = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        batch_size: Count = 1,
        num_workers: NonNegativeInt = 0,
        seed: Seed | None = 0,
        pretrained_model_name_or_path: str = "",
        revision: str | None = None,
        variant: str | None = None,
    ) -> None:
        """Configure the teacher, validation and prior images and how they are batched.

        Args:
            teacher_dir: Directory of teacher images (png/jpg/jpeg/webp, not recursive), with an optional
                manifest.jsonl giving each image's "prompt". A `val/` subfolder is used for validation.
            instance_prompt: Prompt for every teacher image. `{prompt}` is replaced by the image's prompt
                from teacher_dir/manifest.jsonl.
            num_teacher_images: Train on the first N teacher images (sorted by file name); all if unset.
            val_teacher_dir: Held-out teacher images for validation loss/KID. Defaults to teacher_dir/val/
                when that exists.
            num_val_images: Alternatively hold out the last K images of teacher_dir (taken before
                num_teacher_images, never overlapping the training images). 0: no hold-out.
            class_prompt: Prompt of the prior-preservation class images, made by the base model. Setting it
                turns prior preservation on.
            prior_dir: Where class images are generated and cached (required with class_prompt); reused
                across runs with the same class prompt and base model.
            num_prior_images: Number of class images; missing ones are generated (image i with seed i).
            prior_generation_steps: Sampling steps for class-image generation.
            prior_guidance_scale: Classifier-free guidance scale for class-image generation.
            prior_batch_size: Images per pipeline call during class-image generation.
            resolution: Training resolution in pixels (square); a positive multiple of 8 (VAE downsampling).
            center_crop: Centre crop after resizing the short side to resolution; random crop if false.
            random_flip: Flip training images horizontally with probability 0.5.
            batch_size: Teacher images per batch and rank; prior preservation adds as many class images.
            num_workers: DataLoader worker processes.
            seed: Seed of the training order and augmentations (a run is a pure function of it). The CLI
                defaults it to --seed_everything.
            pretrained_model_name_or_path: Base model that generates class images (linked from --model).
            revision: Base model revision (linked from --model).
            variant: Base model weight variant, e.g. fp16 (linked from --model).
        """
        super().__init__()
        self.save_hyperparameters()
        if resolution < 8 or resolution % 8:
            raise ValueError(f"--data.resolution must be a positive multiple of 8, got {resolution}")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {num_workers}")
        if num_teacher_images is not None and num_teacher_images < 1:
            raise ValueError(
                f"--data.num_teacher_images must be >= 1 (or unset for all), got {num_teacher_images}"
            )
        if num_val_images < 0:
            raise ValueError(f"--data.num_val_images must be >= 0, got {num_val_images}")
        if val_teacher_dir is not None and num_val_images:
            raise ValueError(
                "--data.val_teacher_dir and --data.num_val_images both choose the validation images; set only one"
            )
        if class_prompt is not None:
            if not class_prompt.strip():
                raise ValueError(
                    "--data.class_prompt is empty; leave it unset to turn prior preservation off"
                )
            if not prior_dir:
                raise ValueError(
                    "--data.prior_dir is required when --data.class_prompt is set (class-image cache)"
                )
            if num_prior_images < 1:
                raise ValueError(
                    f"--data.num_prior_images must be >= 1 with --data.class_prompt, got {num_prior_images}"
                )
            if prior_generation_steps < 1:
                raise ValueError(f"--data.prior_generation_steps must be >= 1, got {prior_generation_steps}")
            if prior_batch_size < 1:
                raise ValueError(f"--data.prior_batch_size must be >= 1, got {prior_batch_size}")

        self.train_teacher_paths, self.val_teacher_paths = self._split_teacher()
        # Prompts are resolved now so a missing {prompt} entry fails at startup, not after generation.
        self.train_teacher_prompts = self._instance_prompts(self.train_teacher_paths)
        self.val_teacher_prompts = self._instance_prompts(self.val_teacher_paths)
        self.prior_paths: list[Path] = (
            [Path(prior_dir) / slot_name(i) for i in range(num_prior_images)]
            if self.with_prior_preservation
            else []
        )
        self.train_dataset: TeacherPriorDataset | None = None
        self.val_dataset: TeacherPriorDataset | None = None

    @property
    def with_prior_preservation(self) -> bool:
        """Whether training batches carry prior (class) examples."""
        return self.hparams.class_prompt is not None

    # -- teacher images

    def _split_teacher(self) -> tuple[list[Path], list[Path]]:
        hp = self.hparams
        pool = list_images(hp.teacher_dir, "--data.teacher_dir")
        val: list[Path] = []
        if hp.num_val_images:
            if hp.num_val_images >= len(pool):
                raise ValueError(
                    f"--data.num_val_images={hp.num_val_images} leaves no training images: "
                    f"{hp.teacher_dir} has {len(pool)}"
                )
            pool, val = pool[: -hp.num_val_images], pool[-hp.num_val_images :]
        elif hp.val_teacher_dir is not None:
            if Path(hp.val_teacher_dir).resolve() == Path(hp.teacher_dir).resolve():
                raise ValueError(
                    "--data.val_teacher_dir is --data.teacher_dir: validation images must be held out"
                )
            val = list_images(hp.val_teacher_dir, "--data.val_teacher_dir")
        elif (Path(hp.teacher_dir) / "val").is_dir():
            val = list_images(Path(hp.teacher_dir) / "val", "--data.teacher_dir (its val/ subfolder)")
        if hp.num_teacher_images is not None:
            if hp.num_teacher_images > len(pool):
                held = f" after holding out {len(val)} for validation" if hp.num_val_images else ""
                raise ValueError(
                    f"--data.num_teacher_images={hp.num_teacher_images} but {hp.teacher_dir} has only "
                    f"{len(pool)} training images{held}"
                )
            pool = pool[: hp.num_teacher_images]
        return pool, val

    def _instance_prompts(self, paths: list[Path]) -> list[str]:
        template: str = self.hparams.instance_prompt
        if "{prompt}" not in template:
            return [template] * len(paths)
        by_dir: dict[Path, dict[str, dict]] = {}
        prompts = []
        for path in paths:
            if path.parent not in by_dir:
                by_dir[path.parent] = {
                    Path(str(r.get("file", ""))).name: r for r in read_manifest(path.parent)
                }
            prompt = by_dir[path.parent].get(path.name, {}).get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(
                    f"{path}: --data.instance_prompt contains {{prompt}} but {manifest_path(path.parent)} "
                    "has no prompt for this image"
                )
            prompts.append(template.replace("{prompt}", prompt))
        return prompts

    # -- prior (class) images

    def _check_prior_dir_writable(self, prior_dir: Path) -> None:
        try:
            prior_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=prior_dir, prefix=".write_test.")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            cls = PermissionError if isinstance(err, PermissionError) else OSError
            raise cls(f"--data.prior_dir: cannot create or write {prior_dir}: {err}") from err

    def prepare_data(self) -> None:
        """Generate the class images that prior_dir lacks (Lightning runs this once per node).

        A class image is present as a teacher image is (`dallm.teacher.slots.scan`): its file, its sha256
        in the manifest, and the manifest's prompt, model, steps and guidance equal to this run's; other
        settings are refused, naming the flag. The directory is locked while it is filled, and temp files
        of a killed earlier run are removed first.
        """
        if not self.with_prior_preservation:
            return
        hp = self.hparams
        prior_dir = Path(hp.prior_dir)
        self._check_prior_dir_writable(prior_dir)
        # Released on return, and by the OS if the process is killed; a parallel run of a sweep sharing
        # the class images waits for the one filling them, then finds them present.
        with lock_directory(prior_dir, wait=True):
            remove_stale_temp_files(prior_dir)
            self._fill_prior_dir(prior_dir)

    def _fill_prior_dir(self, prior_dir: Path) -> None:
        hp = self.hparams
        model = model_id(hp.pretrained_model_name_or_path)
        settings: dict[str, Any] = {"prompt": hp.class_prompt}
        if model:  # without a model nothing can be generated; images already there are taken as they are
            settings["model"] = model
        settings |= {"steps": hp.prior_generation_steps, "guidance_scale": hp.prior_guidance_scale}
        slots = [Slot(prior_dir, i) for i in range(hp.num_prior_images)]
        # A file without a manifest line was left by a crash between image and line: it is made again.
        missing = scan(prior_dir, slots, settings, PRIOR_FLAGS).missing
        print(
            f"prior: {len(slots) - len(missing)} of {hp.num_prior_images} class images present in "
            f"{prior_dir}, generating {len(missing)}"
            + (
                f" with {model} ({hp.prior_generation_steps} steps, guidance {hp.prior_guidance_scale})"
                if missing
                else ""
            ),
            flush=True,
        )
        if not missing:
            return
        if not model:
            raise ValueError(
                "--model.pretrained_model_name_or_path (--data.pretrained_model_name_or_path) is needed to "
                f"generate {len(missing)} class images into --data.prior_dir {prior_dir}"
            )
        pipe = load_base_pipeline(hp.pretrained_model_name_or_path, revision=hp.revision, variant=hp.variant)
        try:
            # Image i gets seed i (base seed 0), whatever run or batch it is generated in: reproducible.
            fill_slots(
                pipe,
                missing,
                hp.class_prompt,
                0,
                num_inference_steps=hp.prior_generation_steps,
                guidance_scale=hp.prior_guidance_scale,
                height=hp.resolution,
                width=hp.resolution,
                batch_size=hp.prior_batch_size,
                model=model,
            )
        finally:
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the training model needs the memory next

    # -- datasets and loaders

    def setup(self, stage: str | None = None) -> None:
        """Decode and validate every teacher (train + val) and prior image, then build the datasets."""
        if self.train_dataset is not None:
            return
        hp = self.hparams
        for path in self.prior_paths:
            if not path.is_file():
                raise FileNotFoundError(
                    f"--data.prior_dir: class image {path} is missing; prepare_data() generates it "
                    "(on multi-node runs prior_dir must be on a shared file system)"
                )
        if not self.train_teacher_paths:
            raise ValueError(f"--data.teacher_dir: no training images in {hp.teacher_dir}")
        train = TeacherPriorDataset(
            list(zip(self.train_teacher_paths, self.train_teacher_prompts, strict=True)),
            [(p, hp.class_prompt) for p in self.prior_paths],
            resolution=hp.resolution,
            center_crop=hp.center_crop,
            random_flip=hp.random_flip,
        )
        train.preload()
        val = None
        if self.val_teacher_paths:
            # Validation: fixed centre crop, no flip, so the numbers move only because the model does.
            val = TeacherPriorDataset(
                list(zip(self.val_teacher_paths, self.val_teacher_prompts, strict=True)),
                resolution=hp.resolution,
                center_crop=True,
                random_flip=False,
            )
            val.preload()
        self.train_dataset, self.val_dataset = train, val

    def make_train_sampler(
        self, global_step: int, max_steps: int, accumulate: int = 1, world_size: int = 1, rank: int = 0
    ) -> StepSampler:
        """The training stream of this rank for a run of `max_steps` optimizer steps, from `global_step`."""
        if self.train_dataset is None:
            raise RuntimeError("DallmDataModule.setup() must run before the train sampler is made")
        return StepSampler(
            len(self.train_dataset),
            self.hparams.batch_size,
            self.hparams.seed,
            start_batch=global_step * accumulate,
            total_batches=max_steps * accumulate,
            world_size=world_size,
            rank=rank,
        )

    def make_train_dataloader(self, sampler: StepSampler) -> StepDataLoader:
        """A DataLoader over the training set in `sampler`'s order."""
        workers = self.hparams.num_workers
        return StepDataLoader(
            self.train_dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> StepDataLoader:
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError(
                "train_dataloader() reads max_steps/global_step from the Trainer; without one use "
                "make_train_dataloader(make_train_sampler(...))"
            )
        if trainer.max_steps is None or trainer.max_steps <= 0:
            raise ValueError("--trainer.max_steps must be set (> 0): dallm trains for a number of steps")
        # Lightning restores global_step before it asks for this loader, so a resumed run continues the stream.
        sampler = self.make_train_sampler(
            trainer.global_step,
            trainer.max_steps,
            trainer.accumulate_grad_batches,
            trainer.world_size,
            trainer.global_rank,
        )
        return self.make_train_dataloader(sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []  # Lightning skips validation
        return DataLoader(
            self.val_dataset,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )
