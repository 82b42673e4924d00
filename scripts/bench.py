"""Training-step benchmark: dallm as configured vs a diffusers-example-style reference loop, in one run.

    python scripts/bench.py --arch tiny --device cpu --json
    python scripts/bench.py --arch sd15 --device cuda --dtype bf16 --batch_size 8 --json
    python scripts/bench.py --arch sd15 --device cuda --dtype bf16 --batch_size 1 --gradient_checkpointing --json

Same model (random weights, `dallm.arch`), resolution, batch, LoRA rank and prior preservation (each step
sees batch_size teacher + batch_size class images) for every loop:

- `dallm`: DallmModule's own step in a bare loop: frozen base in --dtype, fp32 LoRA + tokens, latents
  from the cache, class-prompt text states from the cache, SDPA attention, options as given.
- `lightning`: the same module driven by a Lightning Trainer (for `lightning_overhead_ratio`).
- `reference`: what the diffusers dreambooth-LoRA example does per step: VAE-encode the pixels and run the
  text encoder every step, autocast, fp32 LoRA, no caching, no compile.

Every distinct image is encoded into the latent cache before timing (a run's steady state: with 20 + 20
images at batch 1 the first 20 steps would otherwise be cache misses). `--interleave` alternates dallm and
reference steps on one module, so that a shared machine's load hits both alike. `--activations` prints
the bytes autograd saves for one step's backward (saved-tensor hooks) instead of timing:

    python scripts/bench.py --arch sd15 --device cpu --resolution 128 --batch_size 1 --interleave --json
    python scripts/bench.py --arch sd15 --device cpu --dtype bf16 --resolution 128 --batch_size 1 --activations

Prints median step time over --steps after --warmup steps, samples/s (teacher + class images per second)
and peak memory (CUDA max allocated on GPU, peak RSS of the process on CPU); --json prints one object per
figure in the benchmarks/results.jsonl schema. One KID round is timed by scripts/bench_kid.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import sys
import time
from datetime import date

import torch

from dallm import diffusion
from dallm.arch.sdxl import build_arch_components
from dallm.module import DallmModule

PROMPT = "a realistic painting of a cat in baroque art style like <s1><s2>"
CLASS = "a realistic painting of a cat in baroque art style"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_module(args, dtype, **options) -> DallmModule:
    m = DallmModule("random:" + args.arch, rank=args.rank, instance_prompt=PROMPT, **options)
    m.attach_base(**build_arch_components(args.arch, dtype=dtype, device=args.device))
    return m.to(args.device)


def make_batches(args, n: int) -> list[dict]:
    """`n` batches of batch_size teacher + batch_size class images, cycling over 20 + 20 distinct images."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    out = []
    for i in range(n):
        idx = [(i * args.batch_size + j) % 20 for j in range(args.batch_size)]
        out.append(
            {
                "pixel_values": torch.cat([images[idx], images[[20 + k for k in idx]]]),
                "prompts": [PROMPT] * args.batch_size + [CLASS] * args.batch_size,
                "is_prior": torch.tensor([False] * args.batch_size + [True] * args.batch_size),
                "keys": [f"t{k}" for k in idx] + [f"c{k}" for k in idx],
            }
        )
    return out


def dallm_step(m: DallmModule, opt, batch: dict, step: int) -> None:
    losses = m.diffusion_losses(batch, m.step_generator(step))
    loss, _, _ = diffusion.instance_prior_loss(losses, batch["is_prior"].to(losses.device), 1.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def reference_step(m: DallmModule, opt, batch: dict, step: int, autocast_dtype) -> None:
    """The diffusers example's step: encode pixels and prompts every time, under autocast."""
    device = m.device
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pixels = batch["pixel_values"].to(device, m.vae.dtype)
        latents = m.vae.encode(pixels).latent_dist.sample() * m.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = m.noise_scheduler.add_noise(latents, noise, t)
        ids = m.tokenizer(batch["prompts"], padding="max_length", max_length=m.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(device)  # fmt: skip
        hidden = m.text_encoder(ids)[0]
        pred = m.unet(noisy, t, hidden).sample
        n = pred.shape[0] // 2
        loss = torch.nn.functional.mse_loss(pred[:n].float(), noise[:n].float())
        loss = loss + torch.nn.functional.mse_loss(pred[n:].float(), noise[n:].float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def warm_cache(m: DallmModule, batches: list[dict]) -> int:
    """Encode every distinct image of `batches` into the latent cache before timing; returns how many.

    Without this the first 20 steps at batch 1 (20 distinct teacher + 20 class images) would be misses.
    """
    encode = lambda x: m.vae.encode(x).latent_dist.parameters  # noqa: E731
    seen: set[str] = set()
    for batch in batches:
        keep = [i for i, k in enumerate(batch["keys"]) if k not in seen]
        if keep:
            pixels = batch["pixel_values"][keep].to(m.device, m.vae.dtype)
            m.latent_cache.latent_params([batch["keys"][i] for i in keep], pixels, encode)
            seen.update(batch["keys"][i] for i in keep)
    return len(seen)


def time_interleaved(steps: dict, batches, warmup: int, device: str) -> dict[str, list[float]]:
    """Alternate the loops step by step (A, B, A, B, ...) so that a shared machine's load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step_fn in steps.items():
            sync(device)
            start = time.perf_counter()
            step_fn(batch, i)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def time_loop(step_fn, batches, warmup: int, device: str) -> list[float]:
    times = []
    for i, batch in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        step_fn(batch, i)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def time_lightning(m: DallmModule, batches, warmup: int, device: str) -> list[float]:
    """Per-step wall time of the same module under a Lightning Trainer (between consecutive batch ends)."""
    import lightning.pytorch as pl

    marks: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(device)
            marks.append(time.perf_counter())

    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer = pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=len(batches),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Clock()], num_sanity_val_steps=0, limit_val_batches=0,
        precision="bf16-mixed" if m.vae.dtype == torch.bfloat16 else "16-mixed" if m.vae.dtype == torch.float16 else "32-true",
    )  # fmt: skip
    m.optimizer = lambda params: torch.optim.AdamW(params, lr=1e-4)
    trainer.fit(m, train_dataloaders=loader)
    return [b - a for a, b in zip(marks[warmup:], marks[warmup + 1 :], strict=False)]


def saved_activation_bytes(m: DallmModule, batch: dict) -> dict[str, int]:
    """Bytes that autograd keeps for the backward pass of one training step's loss (forward only).

    Counted with `torch.autograd.graph.saved_tensors_hooks`, each storage once (views share storage).
    Keys: "total", and per top-level UNet block ("down_blocks.0", "mid_block", ...; "other" for the rest),
    which bounds what gradient checkpointing recomputes at once. The cache must be warm (no VAE encode).
    """
    # Weights saved for backward (a linear keeps its weight for the input gradient) are not activations.
    seen: set[int] = {p.untyped_storage().data_ptr() for p in m.parameters()}
    by_block: dict[str, int] = {}
    current = ["other"]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            by_block[current[0]] = by_block.get(current[0], 0) + storage.nbytes()
        return t

    handles = []
    for name, block in [*((f"down_blocks.{i}", b) for i, b in enumerate(m.unet.down_blocks)),
                        ("mid_block", m.unet.mid_block),
                        *((f"up_blocks.{i}", b) for i, b in enumerate(m.unet.up_blocks))]:  # fmt: skip
        handles.append(block.register_forward_pre_hook(lambda *_, n=name: current.__setitem__(0, n)))
        handles.append(block.register_forward_hook(lambda *_: current.__setitem__(0, "other")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = m.diffusion_losses(batch, m.step_generator(0))
            losses.sum().backward()  # recomputation under checkpointing packs again: not counted (seen)
    finally:
        for h in handles:
            h.remove()
    return {"total": sum(by_block.values()), **by_block}


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["tiny", "sd15", "sdxl"], default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=None, help="default: 32 (tiny) / 512 (sd15) / 1024 (sdxl)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=["reference", "lightning"])
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--activations", action="store_true",
        help="instead of timing: print the bytes saved for backward by one dallm step (saved-tensor hooks)",
    )  # fmt: skip
    p.add_argument(
        "--interleave", action="store_true",
        help="time dallm and reference alternately on one module (same weights, one copy in memory); "
        "for shared machines. Implies --skip lightning",
    )  # fmt: skip
    args = p.parse_args()
    args.resolution = args.resolution or {"sd15": 512, "sdxl": 1024}.get(args.arch, 32)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    options = {"gradient_checkpointing": args.gradient_checkpointing, "channels_last": args.channels_last,
               "compile": args.compile}  # fmt: skip
    batches = make_batches(args, args.warmup + args.steps)
    samples_per_step = 2 * args.batch_size
    results = {}

    m = make_module(args, dtype, **options)
    opt = torch.optim.AdamW(m.trainable_groups(), lr=1e-4)
    cached = warm_cache(m, batches)
    if args.activations:
        saved = saved_activation_bytes(m, batches[0])
        print(json.dumps({"date": date.today().isoformat(), "arch": args.arch, "metric": "saved_activation_bytes",
                          "value": saved["total"], "unit": "B", "batch_size": args.batch_size,
                          "resolution": args.resolution, "dtype": args.dtype, "by_block": saved,
                          "gradient_checkpointing": args.gradient_checkpointing,
                          "command": "python " + " ".join(sys.argv)}))  # fmt: skip
        return  # timing starts with a warm cache, as in a run after its first epoch
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if args.interleave:
        autocast = None if dtype == torch.float32 else dtype
        ref_opt = torch.optim.AdamW(m.trainable_groups(), lr=1e-4)
        results.update(time_interleaved(
            {"dallm": functools.partial(dallm_step, m, opt),
             "reference": functools.partial(reference_step, m, ref_opt, autocast_dtype=autocast)},
            batches, args.warmup, args.device))  # fmt: skip
        args.skip = ["reference", "lightning"]
    else:
        results["dallm"] = time_loop(functools.partial(dallm_step, m, opt), batches, args.warmup, args.device)
    results["peak"] = peak_memory_gib(args.device)
    if "lightning" not in args.skip:
        results["lightning"] = time_lightning(m, batches, args.warmup, args.device)
    del m, opt
    if "reference" not in args.skip:
        ref = make_module(args, dtype, cache_latents=False)
        ref_opt = torch.optim.AdamW(ref.trainable_groups(), lr=1e-4)
        autocast = None if dtype == torch.float32 else dtype
        results["reference"] = time_loop(
            lambda b, i: reference_step(ref, ref_opt, b, i, autocast), batches, args.warmup, args.device
        )

    card = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    settings = {
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "prior_preservation": True,
        "latent_cache_warm": cached,
        "interleaved": args.interleave,
        **options,
    }
    base = {"date": date.today().isoformat(), "card": card, "arch": args.arch, "batch_size": args.batch_size,
            "resolution": args.resolution, "rank": args.rank, "settings": settings, "command": "python " + " ".join(sys.argv)}  # fmt: skip
    med = {k: statistics.median(v) for k, v in results.items() if isinstance(v, list)}
    figures = [{**base, "metric": "train_samples_per_s", "value": round(samples_per_step / med["dallm"], 3), "unit": "samples/s"},
               {**base, "metric": "train_step_s", "value": round(med["dallm"], 5), "unit": "s"},
               {**base, "metric": "peak_memory_gib", "value": round(results["peak"], 3), "unit": "GiB"}]  # fmt: skip
    if "reference" in med:
        figures.append(
            {
                **base,
                "metric": "reference_samples_per_s",
                "value": round(samples_per_step / med["reference"], 3),
                "unit": "samples/s",
            }
        )
        figures.append(
            {
                **base,
                "metric": "train_ratio_vs_reference",
                "value": round(med["reference"] / med["dallm"], 3),
                "unit": "x",
            }
        )
    if "lightning" in med:
        figures.append(
            {
                **base,
                "metric": "lightning_overhead_ratio",
                "value": round(med["lightning"] / med["dallm"], 3),
                "unit": "x",
            }
        )
    for f in figures:
        print(json.dumps(f) if args.json else f"{f['metric']}: {f['value']} {f['unit']}")


if __name__ == "__main__":
    main()
