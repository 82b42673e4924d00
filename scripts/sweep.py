"""Run the paper's experiment grids on the toy world, one `dallm fit` per cell, skipping finished runs.

    python scripts/sweep.py --grid rank          # rank {1, 4, 16} at 20 teacher images, seeds {0, 1, 2}
    python scripts/sweep.py --grid size          # teacher images {5, 10, 20, 50} at rank 4, seeds {0, 1, 2}
    python scripts/sweep.py --grid rank --steps 2500 --kid_every 250   # the paper's lengths (slow on a CPU)

Each run logs to `<root>/rank=R,n=N,seed=S/version_0/` (TensorBoard events, sample grids, checkpoints,
LoRA). A run whose `lora/last/dallm.json` reports `--steps` global steps is finished and skipped; an
interrupted one resumes from its `last.ckpt` (`--ckpt_path last`). `scripts/plot_kid.py` and
`scripts/make_gif.py` read the results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

GRIDS = {
    "rank": {"rank": [1, 4, 16], "n": [20]},
    "size": {"rank": [4], "n": [5, 10, 20, 50]},
}


def run_name(rank: int, n: int, seed: int) -> str:
    return f"rank={rank},n={n},seed={seed}"


def parse_name(name: str) -> dict[str, int]:
    """`rank=4,n=20,seed=0` -> {"rank": 4, "n": 20, "seed": 0}."""
    return {k: int(v) for k, v in (part.split("=") for part in name.split(","))}


def finished(run_dir: Path, steps: int) -> bool:
    info = run_dir / "version_0" / "lora" / "last" / "dallm.json"
    return info.exists() and json.loads(info.read_text()).get("global_step") == steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), action="append", required=True, help="repeatable")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--kid_every", type=int, default=50)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--root", default="lightning_logs/sweep")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("extra", nargs="*", help="more dallm flags for every run, after --")
    args = p.parse_args()

    cells = []
    for grid in args.grid:
        g = GRIDS[grid]
        for rank, n, seed in itertools.product(g["rank"], g["n"], args.seeds):
            if (rank, n, seed) not in cells:
                cells.append((rank, n, seed))
    root = Path(args.root)
    start = time.perf_counter()
    for k, (rank, n, seed) in enumerate(cells, 1):
        name = run_name(rank, n, seed)
        run_dir = root / name
        if finished(run_dir, args.steps):
            print(f"[{k}/{len(cells)}] {name}: finished, skipped", flush=True)
            continue
        resume = (run_dir / "version_0" / "checkpoints" / "last.ckpt").exists()
        cmd = [
            sys.executable, "-m", "dallm", "fit", "--config", args.config,
            "--seed_everything", str(seed), "--data.seed", str(seed),
            "--model.rank", str(rank), "--data.num_teacher_images", str(n),
            "--trainer.max_steps", str(args.steps), "--kid.every_n_steps", str(args.kid_every),
            "--checkpoint.every_n_train_steps", str(args.kid_every * 5),
            "--trainer.val_check_interval", str(args.kid_every),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false",
            *(["--ckpt_path", "last"] if resume else []), *args.extra,
        ]  # fmt: skip
        print(
            f"[{k}/{len(cells)}] {name}: {'resuming' if resume else 'running'} ({time.perf_counter() - start:.0f} s so far)",
            flush=True,
        )
        if args.dry_run:
            print("  " + " ".join(cmd))
            continue
        log = root / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            sys.exit(f"{name} failed (exit {result.returncode}); see {log}")
    print(f"sweep done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
