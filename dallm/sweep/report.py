"""`dallm report SWEEP_DIR`: KID curves, tables and relative tests of a `dallm sweep`, as Markdown + PNG.

Runs are grouped into settings (the sweep's grid values) over seeds. For each setting the table gives
`kid/val` at step 0, at its best and at the end as mean ± between-seed std, with the mean per-round
standard error (`kid/val_se`, where the KID callback logs it). Settings that differ in one flag form a
family (rank at 20 images, images at rank 4, ...): one plot each, and a relative test of every pair.

The relative test needs the samples of each run: it reads the instance-prompt row of the last KID
round's grid (`samples/step=NNNNNN.png`, the exact uint8 images the callback scored, lossless PNG),
embeds them with the run's own `--kid.feature`, and tests which setting's samples (all seeds pooled)
are closer to the held-out teacher images. As a check the report recomputes each run's last `kid/val`
from those images; it must match the logged value.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dallm.sweep.command import RECORD, short_keys
from dallm.sweep.figure import readout_cell, run_report
from dallm.sweep.relative import relative_section
from dallm.sweep.run_files import grid_samples, read_scalars, run_config

TAGS = ("kid/val", "kid/train", "kid/prior")


# ---------------------------------------------------------------------------------------- reading
def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """The runs of a sweep: {"name", "dir", "settings": {flag: value}, "seed", "status"}, by name."""
    runs = []
    for d in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        rec_path = d / RECORD
        if rec_path.exists():
            rec = json.loads(rec_path.read_text())
            runs.append({"name": d.name, "dir": d, "settings": rec["settings"], "seed": rec["seed"],
                         "status": rec.get("status")})  # fmt: skip
        elif "seed=" in d.name and any(d.glob("events.out.tfevents.*")):
            # Runs made without `dallm sweep`: key=value,...,seed=S directory names.
            parts = dict(p.split("=", 1) for p in d.name.split(","))
            seed = int(parts.pop("seed"))
            runs.append({"name": d.name, "dir": d, "settings": parts, "seed": seed, "status": None})
    if not runs:
        raise ValueError(
            f"SWEEP_DIR {sweep_dir}: no runs (directories with {RECORD} or key=value,seed=S names)"
        )
    return runs


def setting_key(settings: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(settings.items())


def label(key: tuple[tuple[str, str], ...]) -> str:
    names = short_keys([k for k, _ in key])
    return ", ".join(f"{names[k]} {v}" for k, v in key) or "all runs"


def _num(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return v


def families(keys: list[tuple[tuple[str, str], ...]]) -> list[tuple[str, dict[str, str], list]]:
    """Groups of settings that differ in one flag only: [(flag, the fixed others, [settings by value])]."""
    out = []
    flags = [k for k, _ in keys[0]] if keys else []
    for flag in flags:
        groups: dict[tuple, list] = {}
        for key in keys:
            fixed = tuple((k, v) for k, v in key if k != flag)
            groups.setdefault(fixed, []).append(key)
        for fixed, members in groups.items():
            if len(members) > 1:
                members.sort(key=lambda key: _num(dict(key)[flag]))
                out.append((flag, dict(fixed), members))
    return out


# ---------------------------------------------------------------------------------------- statistics
def seed_stats(curves: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps present in every seed, and the mean and between-seed std (ddof 1; 0 for one seed) at each."""
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = np.array([[c[s] for s in steps] for c in curves])  # (seeds, steps)
    std = values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
    return np.array(steps), values.mean(0), std


def summarize(per_run: list[dict[str, dict[int, float]]], tag: str = "kid/val") -> dict[str, Any] | None:
    """Step 0, best (of the mean curve) and last `tag` of one setting's runs; SE = mean per-round SE."""
    curves = [r[tag] for r in per_run if r.get(tag)]
    if not curves:
        return None
    steps, mean, std = seed_stats(curves)
    ses = [r.get(f"{tag}_se", {}) for r in per_run]

    def at(i: int) -> dict[str, Any]:
        se = [s[int(steps[i])] for s in ses if int(steps[i]) in s]
        return {"step": int(steps[i]), "mean": float(mean[i]), "std": float(std[i]),
                "se": float(np.mean(se)) if len(se) == len(curves) else None}  # fmt: skip

    best = int(np.argmin(mean))
    return {"seeds": len(curves), "start": at(0), "best": at(best), "last": at(len(steps) - 1)}


def fmt(cell: dict[str, Any], start: float | None = None, seeds: int = 2) -> str:
    text = f"{cell['mean']:.4f}" + (f" ± {cell['std']:.4f}" if seeds > 1 else "")
    if cell.get("se") is not None:
        text += f" (se {cell['se']:.4f})"
    if start:
        text += f", {cell['mean'] / start:.2f}x"
    return text


# ---------------------------------------------------------------------------------------- output
def plot_family(flag: str, fixed: dict, members: list, stats: dict, tags: list[str], out: Path) -> None:
    """KID vs step, one line per setting (mean over seeds), band ± between-seed std, error bars ± mean SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = [t for t in tags if any(c.get(t) for m in members for c in stats[m]["curves"])]
    fig, axes = plt.subplots(1, len(tags), figsize=(5 * len(tags), 3.6), squeeze=False)
    name = short_keys([flag])[flag]
    for ax, tag in zip(axes[0], tags, strict=True):
        for key in members:
            curves = [c[tag] for c in stats[key]["curves"] if c.get(tag)]
            if not curves:
                continue
            steps, mean, std = seed_stats(curves)
            line = ax.plot(
                steps, mean, marker="o", ms=3, label=f"{name} {dict(key)[flag]} ({len(curves)} seeds)"
            )[0]
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15, color=line.get_color())
            ses = [c.get(f"{tag}_se", {}) for c in stats[key]["curves"] if c.get(tag)]
            if all(set(steps) <= set(s) for s in ses):
                se = np.array([[s[int(t)] for t in steps] for s in ses]).mean(0)
                ax.errorbar(steps, mean, yerr=se, fmt="none", capsize=2, color=line.get_color(), alpha=0.8)
        ax.set_title(f"{tag} ({', '.join(f'{short_keys([k])[k]} {v}' for k, v in fixed.items()) or 'all'})")
        ax.set_xlabel("training step")
        ax.set_ylabel("KID")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def make_gif(
    run_dirs: list[tuple[str, Path]],
    out: Path,
    resolution: int,
    samples: int = 8,
    scale: int = 3,
    ms: int = 600,
) -> int:
    """A GIF of sample rows over training, one row per (label, run dir), at the steps all runs share."""
    from PIL import Image, ImageDraw

    grids = {
        lab: {int(f.stem.split("=")[1]): f for f in (d / "samples").glob("step=*.png")} for lab, d in run_dirs
    }
    steps = sorted(set.intersection(*(set(g) for g in grids.values())))
    if not steps:
        raise ValueError(f"no common sample grids in {[str(d) for _, d in run_dirs]}")
    label_w, frames = 110, []
    for step in steps:
        rows = []
        for lab, _ in run_dirs:
            imgs = grid_samples(grids[lab][step], resolution, samples)  # (S, 3, r, r)
            row = (imgs.permute(2, 0, 3, 1).reshape(resolution, -1, 3) * 255).round().byte().numpy()
            rows.append(
                Image.fromarray(row).resize(
                    (row.shape[1] * scale, resolution * scale), Image.Resampling.NEAREST
                )
            )
        frame = Image.new("RGB", (label_w + rows[0].width, 20 + sum(r.height for r in rows)), (255, 255, 255))
        draw = ImageDraw.Draw(frame)
        draw.text((4, 4), f"step {step}", fill=(0, 0, 0))
        y = 20
        for (lab, _), row in zip(run_dirs, rows, strict=True):
            frame.paste(row, (label_w, y))
            draw.text((4, y + row.height // 2 - 5), lab, fill=(0, 0, 0))
            y += row.height
        frames.append(frame)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=ms, loop=0)
    return len(frames)


def report(
    sweep_dir: str,
    out: str | None = None,
    tags: list[str] = list(TAGS),  # noqa: B006
    relative: bool = True,
    gif: bool = False,
    device: str = "cpu",
) -> int:
    """Write a Markdown report (tables, curves as PNG, relative tests) of a `dallm sweep` directory, or of one run.

        python -m dallm report lightning_logs/sweep_toy --out docs/sweep_toy.md
        python -m dallm report lightning_logs/toy/version_0   # one run: its figure (dallm.sweep.figure)

    Args:
        sweep_dir: the sweep's directory (SAVE_DIR/NAME of `dallm sweep`): one subdirectory per run; or one
            run's directory (with config.yaml and samples/): its figure and a table of its KID rounds.
        out: the Markdown file; PNGs go beside it (<stem>_<flag>_<n>.png). Default: SWEEP_DIR/report.md.
        tags: scalar tags plotted, one panel each.
        relative: run the relative KID test between the settings of each family (needs the runs'
            sample grids and held-out teacher images; features with each run's --kid.feature).
        gif: also write a GIF per family of seed-0 samples over training (like the paper's Fig. 4).
        device: device of the feature extractor for the relative tests.
    """
    sweep_path = Path(sweep_dir)
    if not sweep_path.is_dir():
        raise ValueError(f"SWEEP_DIR {sweep_dir}: not a directory")
    if (sweep_path / "config.yaml").is_file() and (sweep_path / "samples").is_dir():
        return run_report(sweep_path, Path(out) if out else None)  # one run: its figure and rounds
    out_path = Path(out) if out else sweep_path / "report.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    runs = load_runs(sweep_path)
    # Unfinished runs would cut every seed's curve short: left out, and named.
    unfinished = [r["name"] for r in runs if r["status"] not in (None, "done")]
    runs = [r for r in runs if r["status"] in (None, "done")]
    if not runs:
        raise ValueError(f"SWEEP_DIR {sweep_dir}: no finished runs yet")
    stats: dict[tuple, dict] = {}
    for r in runs:
        entry = stats.setdefault(setting_key(r["settings"]), {"runs": [], "curves": []})
        entry["runs"].append(r)
        entry["curves"].append(read_scalars(r["dir"]))
    keys = sorted(stats, key=lambda key: [(isinstance(_num(v), str), _num(v)) for _, v in key])
    lines = [f"# Sweep `{sweep_path.name}`", "",
             f"{len(runs)} runs, {len(keys)} settings; written by `python -m dallm report {sweep_dir}`. "
             "Values: mean ± between-seed std over seeds, (se: mean per-round standard error of KID), "
             "and the ratio to step 0.", ""]  # fmt: skip
    if unfinished:
        lines += [f"Left out, not finished (failed, interrupted or running): {', '.join(unfinished)}.", ""]
    summary: dict[str, Any] = {"settings": {}, "relative": []}
    lines += [
        "| setting | seeds | kid/val step 0 | best (step) | last (step) | kid/prior last | readouts last |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        s = summarize(stats[key]["curves"], "kid/val")
        p = summarize(stats[key]["curves"], "kid/prior")
        if s is None:
            continue
        summary["settings"][label(key)] = {"kid/val": s, "kid/prior": p}
        n = s["seeds"]
        start = s["start"]["mean"]
        lines.append(
            f"| {label(key)} | {n} | {fmt(s['start'], None, n)} | {fmt(s['best'], start, n)} ({s['best']['step']}) | "
            f"{fmt(s['last'], start, n)} ({s['last']['step']}) | {fmt(p['last'], None, n) if p else '-'} | "
            f"{readout_cell(stats[key]['curves'])} |"
        )
    fams = families(keys)
    for i, (flag, fixed, members) in enumerate(fams):
        png = out_path.with_name(f"{out_path.stem}_{short_keys([flag])[flag]}_{i}.png")
        plot_family(flag, fixed, members, stats, list(tags), png)
        lines += ["", f"![{flag} at {fixed}]({png.name})", "",
                  "Line: mean over seeds; band: ± between-seed std; bars: ± mean per-round SE."]  # fmt: skip
        if gif:
            gif_path = png.with_suffix(".gif")
            dirs = [
                (f"{short_keys([flag])[flag]} {dict(k)[flag]}", next(r["dir"] for r in stats[k]["runs"]))
                for k in members
            ]
            make_gif(dirs, gif_path, run_config(dirs[0][1])["data"]["resolution"])
            lines += ["", f"Samples over training (first seed): [{gif_path.name}]({gif_path.name})"]
    if relative and fams:
        lines += ["", *relative_section(fams, stats, summary, device, label)]
    out_path.write_text("\n".join(lines) + "\n")
    out_path.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"dallm report: wrote {out_path} ({len(fams)} plots)")
    return 0


def report_main(argv: list[str]) -> int:
    """`python -m dallm report SWEEP_DIR [--out report.md] ...` (see `report`); bad input: exit 2."""
    from jsonargparse import ArgumentParser

    from dallm.errors import PARSER_KWARGS

    parser = ArgumentParser(prog="dallm report", description=report.__doc__.split("\n\n")[0], **PARSER_KWARGS)
    parser.add_function_arguments(report, as_group=False, as_positional=True)
    cfg = parser.parse_args(argv)
    try:
        return report(**cfg.as_dict())
    except (ValueError, OSError) as err:
        if os.environ.get("DALLM_TRACEBACK"):
            raise
        print(f"dallm report: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
