"""Write a random-weight Stable Diffusion base in the diffusers layout, loadable like a local SD v1-5 copy.

    python scripts/make_random_base.py --arch sd15 --out /tmp/sd15-random --dtype fp16
    python scripts/make_random_base.py --arch sdxl --out /tmp/sdxl-random --dtype bf16
    python -m dallm fit --config configs/sd15_baroque_cats.yaml \
        --model.pretrained_model_name_or_path /tmp/sd15-random ...

`sd15`: SD v1-5's UNet (860 M), VAE (84 M) and CLIP ViT-L/14 text encoder (123 M) from `dallm/arch`'s
configs, a 49,408-id CLIP BPE tokenizer that keeps the paper's prompt words whole (see dallm.arch), and
SD v1-5's PNDM scheduler config. `sdxl`: SDXL 1.0 base's UNet (2.6 B), VAE, CLIP ViT-L and OpenCLIP bigG
text encoders (123 M, 695 M) and Euler scheduler (dallm.arch.sdxl), both tokenizers as sd15's (146 s, 7.3 GiB
peak RSS, 6.5 GB on disk in bf16 here, 2 shared CPU cores). `tiny`, `tiny-sdxl`: the tests' tiny pipelines
(dallm.arch.tiny, dallm.arch.sdxl). Weights are random, so
everything runs (and can be timed and sized) and nothing it makes means anything. About 1 minute and
2.1 GiB on disk for sd15 in fp16 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import torch

from dallm.arch.sdxl import save_random_arch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["sd15", "sdxl", "tiny", "tiny-sdxl"], default="sd15", help="architecture to write")
    p.add_argument("--out", required=True, help="output directory (created; existing files are overwritten)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="stored weight dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = save_random_arch(args.arch, args.out, DTYPES[args.dtype], args.seed)
    print(f"random {args.arch} base ({args.dtype}) written to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
