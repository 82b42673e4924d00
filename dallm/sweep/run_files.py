"""What a finished run directory holds, read back without loading a model: its config.yaml, its
TensorBoard scalars and its KID rounds' sample grids (`samples/step=NNNNNN.png`, the exact uint8 images
each round scored, lossless PNG). Used by `dallm report` (dallm.sweep.report) and the run figure (dallm.sweep.figure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config (config.yaml, written by the CLI at the start of fit)."""
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def last_grid(run_dir: Path) -> tuple[int, Path] | None:
    """(step, path) of the last KID round's sample grid, or None when the run has none."""
    grids = sorted((run_dir / "samples").glob("step=*.png"))
    return (int(grids[-1].stem.split("=")[1]), grids[-1]) if grids else None


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a run's event files; a step logged twice (a resumed run) keeps the last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {t: {e.step: e.value for e in events.Scalars(t)} for t in events.Tags()["scalars"]}


def grid_samples(path: Path, resolution: int, count: int, row: int = 0) -> torch.Tensor:
    """Images 0..count-1 of one row of a KID sample grid (row 0: the instance prompt, 1: the class prompt)
    as (count, 3, res, res) floats in [0, 1], exactly the uint8 images the KID round scored.

    The grid is torchvision's make_grid(padding=1): image j of row i sits at x = 1 + j * (res + 1),
    y = 1 + i * (res + 1).
    """
    from PIL import Image

    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8
    cell = resolution + 1
    y = 1 + row * cell
    if grid.shape[2] < 1 + count * cell:
        raise ValueError(f"{path}: {grid.shape[2]} px wide, too narrow for {count} samples of {resolution} px")
    if grid.shape[1] < y + resolution:
        raise ValueError(f"{path}: {grid.shape[1]} px high, no row {row} of samples of {resolution} px")
    imgs = [grid[:, y : y + resolution, 1 + j * cell : 1 + j * cell + resolution] for j in range(count)]
    return torch.stack(imgs).float() / 255
