"""An animation of a sweep's sample grids over training, one row per run, like the paper's Fig. 4.

    python scripts/make_gif.py lightning_logs/toy_paper --runs rank=1,num_teacher_images=20,seed=0 \
        rank=4,num_teacher_images=20,seed=0 rank=16,num_teacher_images=20,seed=0 --out docs/toy_ranks.gif

A thin wrapper over `dallm.sweep.report.make_gif` (`dallm report --gif true` makes one per family): the
first `--samples` images of the instance-prompt row of each KID round's grid, at the steps all runs share.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dallm.sweep.report import make_gif, run_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir")
    p.add_argument("--runs", nargs="+", required=True, help="run directory names, one row each")
    p.add_argument("--samples", type=int, default=8, help="images per row shown")
    p.add_argument("--scale", type=int, default=3)
    p.add_argument("--ms", type=int, default=600, help="milliseconds per frame")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dirs = [(name.split(",seed=")[0].replace(",", " "), Path(a.sweep_dir) / name) for name in a.runs]
    res = run_config(dirs[0][1])["data"]["resolution"]
    frames = make_gif(dirs, Path(a.out), res, a.samples, a.scale, a.ms)
    print(f"wrote {a.out}: {frames} frames")


if __name__ == "__main__":
    main()
