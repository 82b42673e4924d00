"""Write the tiny offline assets used by `configs/tiny.yaml`: a random-weight SD-architecture base model and
a handful of procedural teacher images.

    python scripts/make_tiny_assets.py --out assets/tiny

Deterministic (fixed seeds); takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from dallm.arch.tiny import build_tiny_pipeline, make_tiny_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/tiny", help="output directory")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    build_tiny_pipeline(out / "base", seed=0)
    make_tiny_images(out / "teacher", n=8, seed=0)
    make_tiny_images(out / "teacher" / "val", n=4, seed=1)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
