"""The picture first: one figure of a run, and `dallm report RUN_DIR`.

Left, images: held-out teacher images, then the base model (the step-0 KID round) and the trained model
(the last round) for the instance prompt and for the class prompt — the KID round's fixed sampling seeds,
so each column is one seed. Right, curves: KID (train, held-out, prior; ± its standard error), the toy
readouts (`toy/*`, in %) and the paired drift (`drift/*`). Everything is read from the run directory
(config.yaml, samples/step=*.png, the TensorBoard events): no model is loaded, nothing is sampled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dallm.sweep.run_files import grid_samples, read_scalars, run_config

READOUTS = {
    "toy/instance_teacher_world": "instance: teacher world",
    "toy/instance_circle": "instance: circles",
    "toy/class_teacher_world": "class: teacher world",
    "toy/class_circle": "class: circles",
}


def held_out_teacher(cfg: dict, resolution: int, count: int) -> torch.Tensor | None:
    """The first `count` held-out teacher images of the run's data config, or None when it has none."""
    from dallm.data.datamodule import DallmDataModule
    from dallm.measure.kid import images_to_tensor

    paths = DallmDataModule(**cfg["data"]).val_teacher_paths[:count]
    return images_to_tensor(paths, size=resolution) if paths else None


def run_rows(run_dir: Path, count: int) -> tuple[list[tuple[str, torch.Tensor]], int, int]:
    """Labelled image rows of a run, and the base's and the trained model's steps."""
    cfg = run_config(run_dir)
    res = cfg["data"]["resolution"]
    grids = sorted((run_dir / "samples").glob("step=*.png"))
    if not grids:
        raise ValueError(
            f"RUN_DIR {run_dir}: no sample grids in samples/ (a run with --kid.every_n_steps > 0)"
        )
    first, last = grids[0], grids[-1]
    steps = [int(g.stem.split("=")[1]) for g in (first, last)]
    count = min(count, cfg["kid"]["num_samples"])
    rows = []
    teacher = held_out_teacher(cfg, res, count)
    if teacher is not None:
        rows.append(("held-out teacher", teacher))
    prompts = [("instance", cfg["data"]["instance_prompt"])]
    if cfg["data"].get("class_prompt"):
        prompts.append(("class", cfg["data"]["class_prompt"]))
    for row, (kind, _prompt) in enumerate(prompts):
        rows.append((f"base, {kind} prompt (step {steps[0]})", grid_samples(first, res, count, row)))
        rows.append((f"trained, {kind} prompt (step {steps[1]})", grid_samples(last, res, count, row)))
    return rows, steps[0], steps[1]


def run_figure(run_dir: str | Path, out: str | Path, count: int = 8) -> Path:
    """Draw the run's figure (see the module docstring) to `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir, out = Path(run_dir), Path(out)
    rows, _, _ = run_rows(run_dir, count)
    scalars = read_scalars(run_dir)
    fig = plt.figure(figsize=(14, 6.2))
    grid = fig.add_gridspec(3, 2, width_ratios=[1.25, 1], hspace=0.55, wspace=0.12)
    ax = fig.add_subplot(grid[:, 0])
    strip = torch.cat([torch.cat(list(imgs), dim=2) for _, imgs in rows], dim=1)  # (3, rows*res, count*res)
    ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
    res = rows[0][1].shape[-1]
    ax.set_yticks([res * (i + 0.5) for i in range(len(rows))], [label for label, _ in rows], fontsize=8)
    ax.set_xticks(
        [res * (j + 0.5) for j in range(rows[0][1].shape[0])],
        [str(j) for j in range(rows[0][1].shape[0])],
        fontsize=7,
    )
    ax.set_xlabel("sampling seed (offset from --kid.seed)", fontsize=8)
    panels = [
        ("KID", [("kid/val", "held-out teacher"), ("kid/train", "training teacher"), ("kid/prior", "class vs base")], 1.0),
        ("toy readouts (%)", list(READOUTS.items()), 100.0),
        ("paired drift vs the base (MSE of noise prediction; log)", [("drift/class", "class"), ("drift/other", "unseen prompts"),
         ("drift/class_guided", "class, guided"), ("drift/other_guided", "unseen, guided")], 1.0),
    ]  # fmt: skip
    for i, (title, tags, scale) in enumerate(panels):
        axis = fig.add_subplot(grid[i, 1])
        for tag, label in tags:
            curve = scalars.get(tag)
            if not curve:
                continue
            steps = sorted(curve)
            values = np.array([curve[s] for s in steps]) * scale
            line = axis.plot(steps, values, marker="o", ms=3, label=label)[0]
            se = scalars.get(f"{tag}_se")
            if se and all(s in se for s in steps):
                err = np.array([se[s] for s in steps]) * scale
                axis.fill_between(steps, values - err, values + err, alpha=0.15, color=line.get_color())
        if "log" in title and axis.lines:
            axis.set_yscale("symlog", linthresh=1e-3)
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7, loc="best")
    fig.axes[-1].set_xlabel("training step", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def readout_table(scalars: dict[str, dict[int, float]]) -> list[str]:
    """Markdown rows: one per KID round, kid/val with its SE, the toy readouts and the drift."""
    tags = ["kid/val", "kid/prior", *READOUTS, "drift/class", "drift/class_guided", "drift/other"]
    tags = [t for t in tags if scalars.get(t)]
    lines = ["| step | " + " | ".join(tags) + " |", "|---" * (len(tags) + 1) + "|"]
    for step in sorted(scalars.get("kid/val", {})):
        cells = []
        for tag in tags:
            value = scalars[tag].get(step)
            if value is None:
                cells.append("-")
            elif tag.startswith("toy/"):
                cells.append(f"{100 * value:.0f}%")
            else:
                se = scalars.get(f"{tag}_se", {}).get(step)
                cells.append(f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def run_report(run_dir: Path, out: Path | None = None) -> int:
    """`dallm report RUN_DIR`: the run's figure and a table of its KID rounds, as Markdown + PNG."""
    out = out or run_dir / "report.md"
    png = run_figure(run_dir, out.with_suffix(".png"))
    lines = [f"# Run `{run_dir}`", "", f"![the run: images and curves]({png.name})", "",
             "Images: the KID rounds' fixed sampling seeds, one column per seed; base = the step-0 round, "
             "trained = the last round. `toy/*`: shares the toy feature net's heads give the 20 samples of "
             "each round; `drift/*`: paired drift of the noise prediction from the base's (dallm.measure.readouts).", "",
             *readout_table(read_scalars(run_dir))]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"dallm report: wrote {out} and {png}")
    return 0


def last_readouts(curves: list[dict[str, dict[int, float]]]) -> dict[str, Any]:
    """Mean and between-seed std of each readout's last value over a setting's runs (the sweep report)."""
    out = {}
    for tag in [*READOUTS, "drift/class", "drift/class_guided"]:
        values = [c[tag][max(c[tag])] for c in curves if c.get(tag)]
        if values:
            out[tag] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    return out


def readout_cell(curves: list[dict[str, dict[int, float]]]) -> str:
    """The last toy readouts and drift of a sweep's setting (mean ± between-seed std), or '-' without them."""
    names = {**READOUTS, "drift/class": "drift/class", "drift/class_guided": "drift/class_guided"}
    cells = []
    for tag, (mean, std) in last_readouts(curves).items():
        scale, unit = (100, "%") if tag.startswith("toy/") else (1, "")
        cells.append(f"{names[tag]} {scale * mean:.3g}{unit} ± {scale * std:.2g}{unit}")
    return "; ".join(cells) or "-"
