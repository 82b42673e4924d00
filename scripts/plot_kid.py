"""KID-vs-steps curves from a sweep's TensorBoard event files, like the paper's Figs. 5, 6 and 8.

    python scripts/plot_kid.py --root lightning_logs/sweep --by rank --fixed n=20 --out docs/kid_rank.png
    python scripts/plot_kid.py --root lightning_logs/sweep --by n --fixed rank=4 --out docs/kid_size.png

One line per value of `--by` (mean over seeds, band = ± std over seeds), one panel per tag (train and
val KID by default). `--table` also prints the final values as a Markdown table.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np


def read_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one tag in a run directory's event files (the last value per step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in events.Scalars(tag)}


def collect(root: Path, by: str, fixed: dict[str, int], tag: str) -> dict[int, dict[int, dict[int, float]]]:
    """{value of `by`: {seed: {step: kid}}} for the runs under `root` matching `fixed`."""
    from sweep import parse_name

    out: dict[int, dict[int, dict[int, float]]] = defaultdict(dict)
    for run in sorted(p for p in root.iterdir() if p.is_dir() and "=" in p.name):
        params = parse_name(run.name)
        if any(params.get(k) != v for k, v in fixed.items()):
            continue
        scalars = read_scalars(run / "version_0", tag)
        if scalars:
            out[params[by]][params["seed"]] = scalars
    return dict(sorted(out.items()))


def mean_std(per_seed: dict[int, dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps present in every seed, and the mean and std over seeds at each."""
    steps = sorted(set.intersection(*(set(s) for s in per_seed.values())))
    values = np.array([[per_seed[seed][step] for step in steps] for seed in per_seed])  # (seeds, steps)
    return np.array(steps), values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="lightning_logs/sweep")
    p.add_argument("--by", choices=["rank", "n"], required=True)
    p.add_argument("--fixed", nargs="*", default=[], help="e.g. n=20 or rank=4")
    p.add_argument("--tags", nargs="+", default=["kid/train", "kid/val"])
    p.add_argument("--out", required=True)
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = {k: int(v) for k, v in (f.split("=") for f in args.fixed)}
    label = {"rank": "rank", "n": "teacher images"}[args.by]
    fig, axes = plt.subplots(1, len(args.tags), figsize=(5 * len(args.tags), 3.6), squeeze=False)
    rows = []
    for ax, tag in zip(axes[0], args.tags, strict=True):
        data = collect(Path(args.root), args.by, fixed, tag)
        if not data:
            raise SystemExit(f"no runs with {tag} under {args.root} matching {fixed}")
        for value, per_seed in data.items():
            steps, mean, std = mean_std(per_seed)
            ax.plot(steps, mean, marker="o", ms=3, label=f"{label} {value} ({len(per_seed)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
            rows.append((tag, value, len(per_seed), steps[0], mean[0], std[0], steps[-1], mean[-1], std[-1]))
        ax.set_title(f"{tag} ({', '.join(f'{k}={v}' for k, v in fixed.items()) or 'all'})")
        ax.set_xlabel("training step")
        ax.set_ylabel("KID (toy features)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    if args.table:
        print(
            f"| tag | {label} | seeds | KID at step {rows[0][3]} | final step | final KID | final / start |"
        )
        print("|---|---|---|---|---|---|---|")
        for tag, value, seeds, _s0, m0, sd0, s1, m1, sd1 in rows:
            print(
                f"| {tag} | {value} | {seeds} | {m0:.4f} ± {sd0:.4f} | {s1} | {m1:.4f} ± {sd1:.4f} | {m1 / m0:.2f} |"
            )


if __name__ == "__main__":
    main()
