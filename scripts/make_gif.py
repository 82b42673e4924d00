"""An animation of a sweep's sample grids over training steps, one row per rank, like the paper's Fig. 4.

    python scripts/make_gif.py --root lightning_logs/sweep --ranks 1 4 16 --n 20 --seed 0 --out docs/toy_ranks.gif

Reads `<root>/rank=R,n=N,seed=S/version_0/samples/step=NNNNNN.png` (the KID rounds' grids; their first
row is the instance prompt) and writes a GIF whose frame k shows every rank at the k-th common step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw


def first_row(grid: Image.Image, resolution: int, samples: int) -> Image.Image:
    """The first `samples` images of the instance-prompt row of a KID sample grid.

    The grid is torchvision's make_grid with padding 1: image j of row 0 sits at x = 1 + j * (res + 1).
    """
    cell = resolution + 1
    return grid.crop((0, 0, min(grid.width, 1 + samples * cell), 1 + cell))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="lightning_logs/sweep")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8, help="images per row shown")
    p.add_argument("--resolution", type=int, default=32, help="sample size in the grids")
    p.add_argument("--scale", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--ms", type=int, default=600, help="milliseconds per frame")
    args = p.parse_args()

    grids = {}
    for rank in args.ranks:
        d = Path(args.root) / f"rank={rank},n={args.n},seed={args.seed}" / "version_0" / "samples"
        files = {int(f.stem.split("=")[1]): f for f in d.glob("step=*.png")}
        if not files:
            raise SystemExit(f"no sample grids in {d}: run scripts/sweep.py first")
        grids[rank] = files
    steps = sorted(set.intersection(*(set(f) for f in grids.values())))
    label_w = 70
    frames = []
    for step in steps:
        rows = []
        for rank in args.ranks:
            grid = Image.open(grids[rank][step]).convert("RGB")
            rows.append(first_row(grid, args.resolution, args.samples))
        w = label_w + max(r.width for r in rows) * args.scale
        h = sum(r.height for r in rows) * args.scale + 20
        frame = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(frame)
        draw.text((4, 4), f"step {step}", fill=(0, 0, 0))
        y = 20
        for rank, row in zip(args.ranks, rows, strict=True):
            big = row.resize((row.width * args.scale, row.height * args.scale), Image.Resampling.NEAREST)
            frame.paste(big, (label_w, y))
            draw.text((4, y + big.height // 2 - 5), f"rank {rank}", fill=(0, 0, 0))
            y += big.height
        frames.append(frame)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(args.out, save_all=True, append_images=frames[1:], duration=args.ms, loop=0)
    print(f"wrote {args.out}: {len(frames)} frames, steps {steps[0]}..{steps[-1]}")


if __name__ == "__main__":
    main()
