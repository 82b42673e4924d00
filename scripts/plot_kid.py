"""KID-vs-steps curves of a `dallm sweep` for one flag, the others fixed (the paper's Figs. 5, 6 and 8).

    python scripts/plot_kid.py lightning_logs/toy_paper --by model.rank --fixed data.num_teacher_images=20 --out docs/kid_rank.png
    python scripts/plot_kid.py lightning_logs/toy_paper --by data.num_teacher_images --fixed model.rank=4 --out docs/kid_size.png

A thin wrapper over `dallm report` (which draws every such family at once): one line per value of
`--by` (mean over seeds, band ± between-seed std, bars ± mean per-round SE), one panel per tag.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dallm.sweep.report import TAGS, load_runs, plot_family, read_scalars, setting_key


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir")
    p.add_argument("--by", required=True, help="the flag that varies, e.g. model.rank")
    p.add_argument(
        "--fixed", nargs="*", default=[], help="FLAG=VALUE of the others, e.g. data.num_teacher_images=20"
    )
    p.add_argument("--tags", nargs="+", default=list(TAGS))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    fixed = dict(f.split("=", 1) for f in args.fixed)
    stats: dict = {}
    for run in load_runs(Path(args.sweep_dir)):
        s = run["settings"]
        if (
            run["status"] not in (None, "done")
            or args.by not in s
            or any(s.get(k) != v for k, v in fixed.items())
        ):
            continue
        entry = stats.setdefault(setting_key(s), {"runs": [], "curves": []})
        entry["runs"].append(run)
        entry["curves"].append(read_scalars(run["dir"]))
    if not stats:
        raise SystemExit(f"no finished runs in {args.sweep_dir} with {args.by} and {fixed}")
    members = sorted(stats, key=lambda k: float(dict(k)[args.by]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_family(args.by, fixed, members, stats, args.tags, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
