"""Teacher and prior images for training: listing, decoding, transforms, the step stream, the DataModule.

Batch contract with the LightningModule (`collate` builds it):

    {"pixel_values": FloatTensor (N, 3, H, W) in [-1, 1],
     "prompts": list[str] of N,
     "is_prior": BoolTensor (N,),
     "seeds": LongTensor (N,)}          # validation batches only: fixed per-image noise seeds

A training batch is B teacher ("instance") examples followed by B prior examples when prior
preservation is on (N = 2B), else just the B instance examples.

The training order is one deterministic stream of (index, augmentation seed) pairs indexed by the
sample position since the start of the run (`StepSampler`), and every transform is a pure function of
its seed, so a run resumed at step k sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from dallm.manifest import IMAGE_EXTENSIONS, manifest_path, read_manifest, sha256_file
from dallm.teacher import consecutive_runs, dtype_kwarg, generate_with_pipeline, model_id

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------- images


def list_images(directory: str | Path, flag: str) -> list[Path]:
    """Image files directly inside `directory` (not recursive, so `val/` stays out), sorted by name.

    `flag` is the CLI flag that named the directory, so errors tell the user what to change.
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"{flag}: directory {directory} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{flag}: {directory} is not a directory")
    # Hidden names are temp files of save_png_atomic or macOS "._x.png" resource forks, not images.
    paths = sorted(
        (
            p
            for p in d.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        ),
        key=lambda p: p.name,
    )
    if not paths:
        raise ValueError(
            f"{flag}: no images in {directory} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            arr = np.nan_to_num(arr)
            # Float images are usually in [0, 1]; anything larger is taken as already 0..255.
            if arr.size and arr.max() <= 1.0:
                arr = arr * 255.0
        else:
            # 16-bit data (I;16*, and mode "I" as Pillow opens 16-bit PNG/TIFF): 65535 -> 255, not a clip at 255.
            arr = np.clip(arr, 0, 65535) / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        # Transparent pixels often hold junk colour (black); the teacher never saw them, white is neutral.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully and return it in mode RGB (alpha composited on white).

    Raises:
        ValueError: naming the file, for a corrupt, truncated or non-image file.
    """
    try:
        with Image.open(path) as im:
            im.load()  # decodes now, so a truncated file fails here and not mid-training
            im = ImageOps.exif_transpose(im)  # a phone photo is trained upright, as it is displayed
            return _to_rgb(im)
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise ValueError(f"{path}: cannot read image: {err}") from err


# ------------------------------------------------------------------------------------- transforms


def resize_shortest_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize (bilinear; PIL antialiases when shrinking) so that the shorter side is `resolution`."""
    w, h = image.size
    if min(w, h) == resolution:
        return image
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def augmentation(size: tuple[int, int], resolution: int, center_crop: bool, random_flip: bool, seed: int):
    """(left, top, flip) of the crop and flip applied to an image of `size` already resized to `resolution`.

    Drawn from `torch.Generator().manual_seed(seed)` only: a pure function of its arguments.
    """
    g = torch.Generator().manual_seed(seed)
    w, h = size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=g))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=g))
    flip = random_flip and float(torch.rand((), generator=g)) < 0.5
    return left, top, flip


def preprocess(
    image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, seed: int
) -> torch.Tensor:
    """Resize, crop and maybe flip `image` into a (3, resolution, resolution) tensor in [-1, 1].

    The random crop offset and the flip come from `augmentation` (seeded), so the result is a pure
    function of (image, arguments): same seed, same tensor, in any worker.
    """
    image = resize_shortest_side(image, resolution)
    left, top, flip = augmentation(image.size, resolution, center_crop, random_flip, seed)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


# ---------------------------------------------------------------------------------- sample stream


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, value: int) -> int:
    """A well-spread non-negative 63-bit seed from (seed, value).

    Hashing instead of `seed + value` keeps runs with neighbouring seeds from replaying each
    other's shuffles shifted by one epoch, which would make a seed sweep less informative.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (value & _MASK64)) >> 1


class StepSampler(Sampler[tuple[int, int]]):
    """The whole run's training order as one deterministic stream, sharded over ranks.

    Stream position p (0, 1, 2, ...) is index `perm_e[p % n]` of epoch `e = p // n`, where `perm_e` is
    `torch.randperm(n)` seeded with `mix_seed(seed, e)`, and carries the augmentation seed
    `mix_seed(seed, -1 - p)`. Per-rank batch q of rank r holds positions
    `(q * world_size + r) * batch_size + j`, j < batch_size, so ranks get disjoint shards, and gradient
    accumulation only means more per-rank batches per optimizer step. The sampler yields
    `(index, aug_seed)` for per-rank batches `[start_batch, total_batches)`: resuming at batch k yields
    exactly the tail of the uninterrupted stream.

    `len()` counts the whole run, `total_batches * batch_size`, not just what is left. Lightning
    restores its in-epoch batch counter on resume and ends the epoch when that counter reaches the
    loader's length; with a length of only the remaining batches, a run resumed mid-way would end its
    epoch early (stepping the optimizer on a partial accumulation) and then replay the tail.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_batch: int,
        total_batches: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if n < 1:
            raise ValueError(f"StepSampler needs n >= 1 items, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_batch < 0 or total_batches < 0:
            raise ValueError(f"need start_batch, total_batches >= 0, got {start_batch}, {total_batches}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_batch, self.total_batches = start_batch, total_batches
        self.world_size, self.rank = world_size, rank

    def position(self, batch: int, j: int) -> int:
        """Stream position of item j of this rank's per-rank batch `batch`."""
        return (batch * self.world_size + self.rank) * self.batch_size + j

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch `epoch` of the stream."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))

    def item(self, position: int) -> tuple[int, int]:
        """(index, aug_seed) at a stream position; a pure function of (n, seed, position)."""
        return int(self.permutation(position // self.n)[position % self.n]), mix_seed(
            self.seed, -1 - position
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, perm = -1, None
        for q in range(self.start_batch, self.total_batches):
            for j in range(self.batch_size):
                p = self.position(q, j)
                if p // self.n != epoch:  # positions only grow: one randperm per epoch
                    epoch = p // self.n
                    perm = self.permutation(epoch)
                yield int(perm[p % self.n]), mix_seed(self.seed, -1 - p)

    def __len__(self) -> int:
        return self.total_batches * self.batch_size


class StepDataLoader(DataLoader):
    """A DataLoader over a `StepSampler` that Lightning treats as resumable.

    The position to resume from needs no saving: it follows from the restored `global_step`. The
    state only records what the stream depends on, so a resume with other data or settings warns
    instead of silently training on a different stream (and Lightning drops its generic
    "dataloader is not resumable" warning).
    """

    def state_dict(self) -> dict[str, int]:
        s = self.sampler
        assert isinstance(s, StepSampler)
        return {"n": s.n, "batch_size": s.batch_size, "seed": s.seed, "world_size": s.world_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        now = self.state_dict()
        changed = {
            k: f"{state_dict[k]} -> {v}" for k, v in now.items() if k in state_dict and state_dict[k] != v
        }
        if changed:
            warnings.warn(
                f"resuming with a different training stream ({changed}; n is the training-set size): the "
                "batches from here on are not those the interrupted run would have seen",
                stacklevel=2,
            )


# --------------------------------------------------------------------------------------- datasets


class TeacherPriorDataset(Dataset):
    """Teacher ("instance") items, each paired with a prior (class) item when prior preservation is on.

    Item i is instance `i % n_instance` and prior `i % n_prior`; the length is the larger count, so an
    epoch of the stream sees every image of the larger set once. Decoded images stay in memory, already
    resized to `resolution` (a few dozen images; decoding a 1024 px PNG costs more than a small step).

    Keys: `(i, aug_seed)` (what `StepSampler` yields) gives a training example augmented with
    `aug_seed`; a plain int `i` gives an evaluation example augmented with seed i and carrying
    `"seed": i`, a fixed noise seed so validation losses are comparable across steps.
    """

    def __init__(
        self,
        instance_items: Sequence[tuple[Path, str]],
        prior_items: Sequence[tuple[Path, str]] | None = None,
        *,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
    ) -> None:
        if not instance_items:
            raise ValueError("TeacherPriorDataset needs at least one instance image")
        self.instance_items = [(Path(p), s) for p, s in instance_items]
        self.prior_items = [(Path(p), s) for p, s in prior_items or []]
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self._images: dict[Path, Image.Image] = {}
        self._content_ids: dict[Path, str] = {}

    def image(self, path: Path) -> Image.Image:
        """The decoded, resized image at `path` (cached)."""
        if path not in self._images:
            self._images[path] = resize_shortest_side(load_rgb(path), self.resolution)
        return self._images[path]

    def preload(self) -> None:
        """Decode every image now, so a broken file fails before training, naming the file."""
        for path, _ in self.instance_items + self.prior_items:
            self.image(path)

    def __len__(self) -> int:
        return max(len(self.instance_items), len(self.prior_items))

    def _example(self, item: tuple[Path, str], aug_seed: int) -> tuple[torch.Tensor, str, str]:
        """(pixels, prompt, variant key): the key names exactly these pixels, for the latent cache."""
        path, prompt = item
        image = self.image(path)
        left, top, flip = augmentation(
            image.size, self.resolution, self.center_crop, self.random_flip, aug_seed
        )
        key = f"{self.content_id(path)}:{self.resolution}:{left},{top}:{int(flip)}"
        return preprocess(image, self.resolution, self.center_crop, self.random_flip, aug_seed), prompt, key

    def content_id(self, path: Path) -> str:
        """sha256 of the file's bytes (cached): the cache key follows the content, not the name."""
        if path not in self._content_ids:
            self._content_ids[path] = sha256_file(path)
        return self._content_ids[path]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            i, aug_seed = int(key[0]), int(key[1])
            out: dict[str, Any] = {}
        else:
            i = aug_seed = int(key)
            out = {"seed": i}
        out["pixel_values"], out["prompt"], out["key"] = self._example(
            self.instance_items[i % len(self.instance_items)], aug_seed
        )
        if self.prior_items:
            out["prior_pixel_values"], out["prior_prompt"], out["prior_key"] = self._example(
                self.prior_items[i % len(self.prior_items)], aug_seed
            )
        return out


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples into the batch contract: all instance examples first, then all prior examples."""
    pixels = [e["pixel_values"] for e in examples]
    prompts = [e["prompt"] for e in examples]
    priors = [e for e in examples if "prior_pixel_values" in e]
    if priors and len(priors) != len(examples):
        raise ValueError("collate: either every example has a prior part or none has")
    pixels += [e["prior_pixel_values"] for e in priors]
    prompts += [e["prior_prompt"] for e in priors]
    keys = [e["key"] for e in examples] + [e["prior_key"] for e in priors]
    batch: dict[str, Any] = {
        "pixel_values": torch.stack(pixels).contiguous(),  # (N, 3, H, W)
        "prompts": prompts,
        "keys": keys,  # what each image is (content, resolution, crop, flip): the latent cache's key
        "is_prior": torch.tensor([False] * len(examples) + [True] * len(priors)),
    }
    if "seed" in examples[0]:
        batch["seeds"] = torch.tensor([e["seed"] for e in examples] * (2 if priors else 1), dtype=torch.long)
    return batch


# ------------------------------------------------------------------------------------- DataModule


class DallmDataModule(pl.LightningDataModule):
    """Teacher images (+ prior-preservation class images made by the base model) for LoRA alignment."""

    def __init__(
        self,
        teacher_dir: str,
        instance_prompt: str = "a realistic painting of a cat in baroque art style like <s1><s2>",
        num_teacher_images: int | None = None,
        val_teacher_dir: str | None = None,
        num_val_images: int = 0,
        class_prompt: str | None = None,
        prior_dir: str | None = None,
        num_prior_images: int = 100,
        prior_generation_steps: int = 25,
        prior_guidance_scale: float = 7.5,
        prior_batch_size: int = 4,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int | None = 0,
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
            [Path(prior_dir) / f"{i:06d}.png" for i in range(num_prior_images)]
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

    def _load_pipeline(self) -> Any:
        """The base model as a diffusers pipeline on the fastest device (fp16 on CUDA)."""
        from diffusers import StableDiffusionPipeline

        hp = self.hparams
        cuda = torch.cuda.is_available()
        pipe = StableDiffusionPipeline.from_pretrained(
            hp.pretrained_model_name_or_path,
            revision=hp.revision,
            variant=hp.variant,
            safety_checker=None,
            requires_safety_checker=False,
            **dtype_kwarg(torch.float16 if cuda else torch.float32),
        )
        return pipe.to("cuda" if cuda else "cpu")

    def prepare_data(self) -> None:
        """Generate the class images that prior_dir lacks (Lightning runs this once per node)."""
        if not self.with_prior_preservation:
            return
        hp = self.hparams
        prior_dir = Path(hp.prior_dir)
        self._check_prior_dir_writable(prior_dir)
        model = model_id(hp.pretrained_model_name_or_path)
        records = read_manifest(prior_dir)
        for r in records:
            other_model = model and r.get("model") != model
            if r.get("prompt") != hp.class_prompt or other_model:
                raise ValueError(
                    f"--data.prior_dir {prior_dir} holds class images of prompt {r.get('prompt')!r} by model "
                    f"{r.get('model')!r} ({manifest_path(prior_dir)}), but this run uses --data.class_prompt "
                    f"{hp.class_prompt!r} with model {model!r}: choose another --data.prior_dir "
                    "(mixing class images of different prompts or models would go unnoticed)"
                )
        settings = {"steps": hp.prior_generation_steps, "guidance_scale": hp.prior_guidance_scale}
        stale = {k for r in records for k, v in settings.items() if k in r and r[k] != v}
        if stale:
            warnings.warn(
                f"{prior_dir}: reusing class images made with other {', '.join(sorted(stale))} than "
                f"{settings}; use another --data.prior_dir to regenerate them",
                stacklevel=2,
            )
        listed = {Path(str(r.get("file", ""))).name for r in records}
        # A file without a manifest line was left by a crash between image and line: regenerate it.
        missing = [i for i, p in enumerate(self.prior_paths) if not (p.name in listed and p.is_file())]
        print(
            f"prior: {len(self.prior_paths) - len(missing)} of {hp.num_prior_images} class images present in "
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
        if not hp.pretrained_model_name_or_path:
            raise ValueError(
                "--model.pretrained_model_name_or_path (--data.pretrained_model_name_or_path) is needed to "
                f"generate {len(missing)} class images into --data.prior_dir {prior_dir}"
            )
        pipe = self._load_pipeline()
        try:
            # Consecutive runs of missing indices, each generated with seeds = indices (reproducible).
            for run in consecutive_runs(missing):
                generate_with_pipeline(
                    pipe,
                    hp.class_prompt,
                    prior_dir,
                    seeds=run,
                    start_index=run[0],
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
