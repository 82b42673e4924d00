"""Training and validation examples: seeded augmentation, the teacher/prior dataset, the batch contract.

Batch contract with the LightningModule (`collate` builds it):

    {"pixel_values": FloatTensor (N, 3, H, W) in [-1, 1],
     "prompts": list[str] of N,
     "keys": list[str] of N,            # content, resolution, crop, flip: the latent cache's key
     "is_prior": BoolTensor (N,),
     "time_ids": FloatTensor (N, 6),    # SDXL's original size, crop top-left, target size of each image
     "seeds": LongTensor (N,)}          # validation batches only: fixed per-image noise seeds

A training batch is B teacher ("instance") examples followed by B prior examples when prior
preservation is on (N = 2B), else just the B instance examples. Every transform is a pure function of
its seed, so an example depends only on (image, settings, seed), in any worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dallm.images import load_rgb, resize_shortest_side
from dallm.manifest import sha256_file


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
        self._sizes: dict[Path, tuple[int, int]] = {}  # (width, height) of the file, before resizing
        self._content_ids: dict[Path, str] = {}

    def image(self, path: Path) -> Image.Image:
        """The decoded, resized image at `path` (cached)."""
        if path not in self._images:
            image = load_rgb(path)
            self._sizes[path] = image.size
            self._images[path] = resize_shortest_side(image, self.resolution)
        return self._images[path]

    def preload(self) -> None:
        """Decode every image now, so a broken file fails before training, naming the file."""
        for path, _ in self.instance_items + self.prior_items:
            self.image(path)

    def __len__(self) -> int:
        return max(len(self.instance_items), len(self.prior_items))

    def _example(self, item: tuple[Path, str], aug_seed: int) -> tuple[torch.Tensor, str, str, torch.Tensor]:
        """(pixels, prompt, variant key, time ids): the key names exactly these pixels, for the latent cache.

        The time ids (SDXL's micro-conditioning, dallm.sdxl.time_ids) follow from what the key names: the
        file's own size, and the crop's top-left in the resized image as it is seen after the flip (a flipped
        crop starts `width - left - resolution` from the left), as diffusers' SDXL scripts flip before cropping.
        """
        from dallm.sdxl import time_ids

        path, prompt = item
        image = self.image(path)
        left, top, flip = augmentation(
            image.size, self.resolution, self.center_crop, self.random_flip, aug_seed
        )
        key = f"{self.content_id(path)}:{self.resolution}:{left},{top}:{int(flip)}"
        pixels = preprocess(image, self.resolution, self.center_crop, self.random_flip, aug_seed)
        width, height = self._sizes[path]
        seen_left = image.width - left - self.resolution if flip else left
        ids = time_ids((height, width), (top, seen_left), (self.resolution, self.resolution))
        return pixels, prompt, key, ids

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
        out["pixel_values"], out["prompt"], out["key"], out["time_ids"] = self._example(
            self.instance_items[i % len(self.instance_items)], aug_seed
        )
        if self.prior_items:
            out["prior_pixel_values"], out["prior_prompt"], out["prior_key"], out["prior_time_ids"] = (
                self._example(self.prior_items[i % len(self.prior_items)], aug_seed)
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
        "time_ids": torch.stack(
            [e["time_ids"] for e in examples] + [e["prior_time_ids"] for e in priors]
        ),  # (N, 6)
    }
    if "seed" in examples[0]:
        batch["seeds"] = torch.tensor([e["seed"] for e in examples] * (2 if priors else 1), dtype=torch.long)
    return batch
