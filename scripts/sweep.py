"""The paper's experiment grids on the toy world, through `dallm sweep` (see `python -m dallm sweep --help`).

    python scripts/sweep.py                                   # rank {1, 4, 16} at 20 images + images {5, 10, 20, 50} at rank 4
    python scripts/sweep.py --sizes 5 20 50 --steps 250       # a shorter version
    python -m dallm report lightning_logs/toy_paper --out docs/toy_paper.md

Runs go to `lightning_logs/<name>/rank=R,num_teacher_images=N,seed=S/`; the same command again skips
finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import signal
import sys

from dallm.sweep.command import sweep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16], help="ranks at --fixed_n images")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[5, 10, 20, 50], help="teacher-set sizes at --fixed_rank"
    )
    p.add_argument("--fixed_n", type=int, default=20)
    p.add_argument("--fixed_rank", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--kid_every", type=int, default=50)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--name", default="toy_paper")
    p.add_argument("--max_parallel", type=int, default=1)
    p.add_argument("--dry_run", action="store_true")
    p.add_argument("extra", nargs="*", help="more dallm fit flags for every run, after --")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill: stop the runs, resumable
    grids = [
        {"model.rank": a.ranks, "data.num_teacher_images": [a.fixed_n]},
        {"model.rank": [a.fixed_rank], "data.num_teacher_images": a.sizes},
    ]
    extra = ["--trainer.max_steps", str(a.steps), "--kid.every_n_steps", str(a.kid_every),
             "--trainer.val_check_interval", str(a.kid_every), "--checkpoint.every_n_train_steps", str(a.kid_every),
             *a.extra]  # fmt: skip
    return sweep(a.config, grids=grids, seeds=a.seeds, name=a.name, max_parallel=a.max_parallel, extra=extra,
                 dry_run=a.dry_run)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
