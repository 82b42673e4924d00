"""Time one KID round: generate N images (guidance, fixed seeds) with the LoRA-carrying model, embed them,
and score them against cached teacher features — the work KIDCallback does every N steps.

    python scripts/bench_kid.py --arch tiny --device cpu --feature '{"class_path": "dallm.arch.tiny.TinyFeatureNet"}'
    python scripts/bench_kid.py --arch sd15 --device cuda --dtype bf16 --resolution 512 --feature inception

Weights are random (`dallm.arch`): time and memory do not depend on their values. `--feature inception`
without `--weights` uses a randomly initialised Inception-v3 of the real shape (11 GFLOP per image).
Prints one JSON object per figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from dallm.arch import build_components, save_random_inception
from dallm.measure.kid import build_feature_extractor, features_of_images, kid_from_features
from dallm.module import DallmModule

PROMPT = "a realistic painting of a cat in baroque art style like <s1><s2>"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 (tiny) / 512 (sd15)")
    p.add_argument("--num_samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, default=20)
    p.add_argument("--feature", default='{"class_path": "dallm.arch.tiny.TinyFeatureNet"}', help="a name or a JSON class_path")
    p.add_argument("--weights", default=None, help="Inception weights; default: random of the real shape")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args()
    res = args.resolution or (512 if args.arch == "sd15" else 32)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    module = DallmModule("random:" + args.arch, rank=args.rank, instance_prompt=PROMPT)
    module.attach_base(**build_components(args.arch, dtype=dtype, device=args.device))
    module.to(args.device)
    weights = args.weights
    if args.feature == "inception" and weights is None:
        weights = str(save_random_inception(Path("/tmp/dallm-random-inception.pth")))
    feature = json.loads(args.feature) if args.feature.startswith("{") else args.feature
    extractor = build_feature_extractor(feature, weights=weights, device=args.device)
    teacher = torch.randn(
        args.num_samples, extractor(torch.rand(1, 3, res, res, device=args.device)).shape[1]
    )

    from diffusers import DPMSolverMultistepScheduler

    def one_round() -> float:
        sync(args.device)
        start = time.perf_counter()
        images = []
        for i in range(0, args.num_samples, args.batch_size):
            seeds = list(range(i, min(i + args.batch_size, args.num_samples)))
            scheduler = DPMSolverMultistepScheduler.from_config(module.noise_scheduler.config)
            images.append(
                module.generate(
                    PROMPT, seeds, args.steps, args.guidance_scale, res, scheduler, output_type="pt"
                )
            )
        feats = features_of_images(
            torch.cat(images).float().clamp(0, 1), extractor, batch_size=args.num_samples
        )
        kid_from_features(teacher, feats)
        sync(args.device)
        return time.perf_counter() - start

    one_round()  # warm-up: kernels, allocator, scheduler tables
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = [one_round() for _ in range(args.rounds)]
    card = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    figure = {
        "date": date.today().isoformat(),
        "card": card,
        "arch": args.arch,
        "metric": "kid_round_s",
        "value": round(statistics.median(times), 4),
        "unit": "s",
        "batch_size": args.batch_size,
        "resolution": res,
        "rank": args.rank,
        "settings": {
            "num_samples": args.num_samples,
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "dtype": args.dtype,
            "feature": args.feature,
            "rounds": times,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if args.device.startswith("cuda")
            else None,
        },
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(figure))


if __name__ == "__main__":
    main()
