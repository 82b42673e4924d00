"""Fill image slots with a diffusers text-to-image pipeline: one seed per image, crash-safe, resumable.

The one diffusers filler: `dallm teacher --backend diffusers` fills a teacher directory with it, and the
DataModule fills `--data.prior_dir` with the base model's class images. Which slots are missing is
decided by `dallm.teacher.slots.scan` (present = file + sha256 + settings); this module only makes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dallm.manifest import append_manifest, save_png_atomic, slot_name, utc_now
from dallm.teacher.slots import Slot


def consecutive_runs(indices: Iterable[int]) -> list[list[int]]:
    """Split sorted indices into runs of consecutive ones: [0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def generate_with_pipeline(
    pipe: Any,
    prompt: str,
    out_dir: str | Path,
    seeds: list[int],
    start_index: int,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    batch_size: int,
    model: str,
    negative_prompt: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate one image per seed with a diffusers text-to-image pipeline into `out_dir`.

    Image k is saved as `out_dir/slot_name(start_index + k)`, then its manifest record is appended.
    Every image gets its own `torch.Generator` seeded with its seed, so an image depends on its seed,
    not on the batch it was generated in (up to float rounding of batched kernels). `height`/`width`
    None leave the size to the pipeline's default.

    Returns:
        The paths written, in seed order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)  # one bar over images below, not one per batch
    scheduler = type(pipe.scheduler).__name__

    from tqdm.auto import tqdm

    paths: list[Path] = []
    with tqdm(total=len(seeds), desc=f"generating {out_dir.name}", unit="img", disable=not progress) as bar:
        for start in range(0, len(seeds), batch_size):
            batch_seeds = [int(s) for s in seeds[start : start + batch_size]]
            b = len(batch_seeds)
            kwargs: dict[str, Any] = {}
            if negative_prompt is not None:
                kwargs["negative_prompt"] = [negative_prompt] * b
            images = pipe(
                prompt=[prompt] * b,
                generator=[torch.Generator(device=pipe.device).manual_seed(s) for s in batch_seeds],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                output_type="pil",
                **kwargs,
            ).images
            for k, (image, seed) in enumerate(zip(images, batch_seeds, strict=True)):
                path = out_dir / slot_name(start_index + start + k)
                sha = save_png_atomic(image, path)
                append_manifest(
                    out_dir,
                    {
                        "file": path.name,
                        "sha256": sha,
                        "backend": "diffusers",
                        "model": model,
                        "prompt": prompt,
                        "negative_prompt": negative_prompt,
                        "seed": seed,
                        "scheduler": scheduler,
                        "steps": num_inference_steps,
                        "guidance_scale": guidance_scale,
                        "size": f"{image.width}x{image.height}",
                        "created": utc_now(),
                    },
                )
                paths.append(path)
            bar.update(b)
    return paths


def fill_slots(
    pipe: Any,
    slots: list[Slot],
    prompt: str,
    base_seed: int,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    batch_size: int,
    model: str,
    negative_prompt: str | None = None,
    progress: bool = True,
) -> int:
    """Generate the image of every slot with its seed `slot.seed(base_seed)`; returns the number made.

    One pipeline call per run of consecutive missing indices of a directory, as the file names of one call
    follow its start index.
    """
    made = 0
    for directory in dict.fromkeys(s.directory for s in slots):
        by_index = {s.index: s for s in slots if s.directory == directory}
        for run in consecutive_runs(sorted(by_index)):
            made += len(
                generate_with_pipeline(
                    pipe,
                    prompt,
                    directory,
                    seeds=[by_index[i].seed(base_seed) for i in run],
                    start_index=run[0],
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    batch_size=batch_size,
                    model=model,
                    negative_prompt=negative_prompt,
                    progress=progress,
                )
            )
    return made
