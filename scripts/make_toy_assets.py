"""Train and write the toy world's assets into the package (dallm/toy/assets/), with fixed seeds:

- base/: a small SD-architecture model in the diffusers layout, trained on the base world only: a CLIP BPE
  tokenizer over the toy captions, a frozen randomly initialised 2-layer CLIP text encoder, a VAE trained
  as a generic image codec (never on the teacher's renderer), and a UNet trained on the base world.
- feature_net.safetensors: the `toy` KID feature net, trained on both worlds with blur augmentation.
- teacher/ (50 images) and teacher/val/ (20 held out): the teacher's baroque circles, with manifests.
- BUILD.md: the command, seeds, times and checks of the build; docs/toy_base_grid.png: what the base draws.

    python scripts/make_toy_assets.py            # ~15 minutes on 2 CPU cores

Every random draw comes from the seeds below, so a rebuild gives the same assets up to floating-point
non-determinism of the CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dallm.arch.tiny import write_clip_bpe_files
from dallm.base import vae_roundtrip
from dallm.manifest import append_manifest, save_png_atomic, save_pretrained, save_safetensors, slot_name
from dallm.measure.kid import kid_from_features
from dallm.toy import world
from dallm.toy.features import ToyFeatureNet

SEEDS = {"vae": 1, "unet": 2, "features": 3, "teacher": 4, "teacher_val": 5, "text_encoder": 6, "check": 7}
ROOT = Path(__file__).resolve().parents[1]
LATENT_CHANNELS = 8


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) in [0, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ VAE
def train_vae(steps: int, batch: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(SEEDS["vae"])
    rng = np.random.default_rng(SEEDS["vae"])
    pool = to_tensor([world.render_generic(rng) for _ in range(12000)]) * 2 - 1  # (N, 3, 32, 32)
    # Three blocks: 32x32 pixels -> 8x8 latents, SD's 8x reduction per side. Eight latent channels, not
    # SD's four: at 8x8 positions four channels cannot hold colour and texture well enough (L1 0.11 vs
    # 0.06 on base-world images after 500 steps), and a blurry, colour-shifted codec sets the KID floor.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), sample_size=32,
    )  # fmt: skip
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(SEEDS["vae"])
    for step in range(steps):
        x = pool[torch.randint(0, len(pool), (batch,), generator=g)]
        if step % 2:
            x = x.flip(3)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        # L1 keeps edges and textures sharper, MSE fixes colour; a tiny KL keeps the latent space smooth.
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(pool[i : i + 512]).latent_dist.mode() for i in range(0, 4096, 512)])
    vae.register_to_config(scaling_factor=float(1 / lat.std()))
    return vae


# ---------------------------------------------------------------------------------- feature net
def train_features(steps: int, batch: int) -> ToyFeatureNet:
    torch.manual_seed(SEEDS["features"])
    rng = np.random.default_rng(SEEDS["features"])
    base = [world.sample_base(rng) for _ in range(6000)]
    baroque = [world.sample_baroque(rng) for _ in range(6000)]
    images = to_tensor([b[0] for b in base] + [b[0] for b in baroque])
    labels = {
        "world": torch.tensor([0] * len(base) + [1] * len(baroque)),
        "shape": torch.tensor([b[2] for b in base] + [b[1] for b in baroque]),
        "colour": torch.tensor([b[3] for b in base] + [b[2] for b in baroque]),
    }
    net = ToyFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(SEEDS["features"])
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = images[idx]
        # Blur augmentation: a blurry image of a style is still that style (VAE reconstructions are blurry).
        sigma = float(torch.rand((), generator=g)) * 1.2
        if sigma > 0.2:
            k = torch.arange(-2, 3, dtype=torch.float32)
            w = torch.exp(-(k**2) / (2 * sigma**2))
            w = w / w.sum()
            x = F.conv2d(
                F.pad(x, (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3
            )
            x = F.conv2d(
                F.pad(x, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3
            )
        logits = net.logits(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"feature net step {step}: loss {loss.item():.4f}")
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ UNet
def train_unet(vae, tokenizer, text_encoder, steps: int, batch: int):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(SEEDS["unet"])
    rng = np.random.default_rng(SEEDS["unet"])
    samples = [world.sample_base(rng) for _ in range(16000)]
    with torch.no_grad():
        pixels = to_tensor([s[0] for s in samples]) * 2 - 1
        latents = torch.cat(
            [vae.encode(pixels[i : i + 512]).latent_dist.mode() for i in range(0, len(pixels), 512)]
        )
        latents = latents * vae.config.scaling_factor  # (N, 8, 8, 8)
        captions = sorted({s[1] for s in samples}) + [""]
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        hidden = text_encoder(ids)[0]  # (C, L, D): the text encoder is frozen, so embed each caption once
    caption_index = torch.tensor([captions.index(s[1]) for s in samples])
    empty = len(captions) - 1
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96), cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=4,
    )  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.03)
    g = torch.Generator().manual_seed(SEEDS["unet"])
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        cap = caption_index[idx].clone()
        cap[torch.rand(batch, generator=g) < 0.1] = empty  # caption dropout: classifier-free guidance
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, hidden[cap]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    return unet.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description="Train and write the toy world's assets.")
    p.add_argument("--out", default=str(ROOT / "dallm" / "toy" / "assets"))
    p.add_argument("--vae_steps", type=int, default=2500)
    p.add_argument("--unet_steps", type=int, default=2500)
    p.add_argument("--feature_steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--recheck_base_kid",
        action="store_true",
        help="Only recompute kid_base_vs_val_teacher from the assets already in --out (no rebuild) and print it.",
    )
    args = p.parse_args()
    if args.recheck_base_kid:
        print(json.dumps(recheck_base_kid(Path(args.out)), indent=2))
        return
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    t0 = time.perf_counter()
    times = {}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    bpe = out / "_bpe"
    write_clip_bpe_files(bpe, world.caption_words())
    tokenizer = CLIPTokenizer(str(bpe / "vocab.json"), str(bpe / "merges.txt"), model_max_length=16)
    shutil.rmtree(bpe)
    torch.manual_seed(SEEDS["text_encoder"])
    # Frozen and random, as the design's prototype showed enough for the UNet to learn from.
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()  # fmt: skip

    start = time.perf_counter()
    vae = train_vae(args.vae_steps, 32)
    times["vae_s"] = time.perf_counter() - start
    start = time.perf_counter()
    features = train_features(args.feature_steps, 128)
    times["feature_net_s"] = time.perf_counter() - start
    save_safetensors(features.state_dict(), out / "feature_net.safetensors")

    # Teacher images: the baroque subject, 50 for training and 20 held out, from separate seeds.
    for sub, n, seed in (("teacher", 50, SEEDS["teacher"]), ("teacher/val", 20, SEEDS["teacher_val"])):
        rng = np.random.default_rng(seed)
        d = out / sub
        d.mkdir(parents=True)
        for i in range(n):
            image, _, _ = world.sample_baroque(rng, world.TEACHER_SHAPE)
            sha = save_png_atomic(image, d / slot_name(i))
            append_manifest(d, {"file": slot_name(i), "sha256": sha, "backend": "toy", "model": "dallm.toy.world.render_baroque",
                                "prompt": world.TEACHER_PROMPT, "seed": seed, "index": i, "size": "32x32"})  # fmt: skip

    start = time.perf_counter()
    unet = train_unet(vae, tokenizer, text_encoder, args.unet_steps, args.batch)
    times["unet_s"] = time.perf_counter() - start
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    save_pretrained(pipe, out / "base")
    times["total_s"] = time.perf_counter() - t0
    checks = check(pipe, features, out)
    write_build_notes(out, args, times, checks)
    log(f"done in {times['total_s']:.0f} s: {json.dumps(checks)}")


def val_teacher(out: Path) -> torch.Tensor:
    """The held-out teacher images of `out`, (20, 3, 32, 32) in [0, 1]."""
    return to_tensor([Image.open(p).convert("RGB") for p in sorted((out / "teacher" / "val").glob("*.png"))])


@torch.no_grad()
def kid_base_vs_val_teacher(
    pipe, features: ToyFeatureNet, out: Path, prompt: str = world.CLASS_PROMPT
) -> float:
    """KID of the base model's samples for the class prompt (20 seeds, 25 steps of the pipeline's scheduler)
    against the held-out teacher images: how far training starts from the teacher."""
    gens = [torch.Generator().manual_seed(k) for k in range(20)]
    base = pipe([prompt] * 20, generator=gens, num_inference_steps=25, output_type="pt").images
    return kid_from_features(features(val_teacher(out)), features(base)).kid_mean


def recheck_base_kid(out: Path) -> dict:
    """Recompute only `kid_base_vs_val_teacher` from the shipped assets in `out` (no training, seconds).

    Also gives the value for the prompt the build of 2026-11-27 used by mistake (the instance prompt with its
    literal `<s1><s2>`, as `replace(" like <s1><s2>", "")` matched nothing), to show it reproduces BUILD.md.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from dallm.toy.features import load_feature_net

    pipe = StableDiffusionPipeline.from_pretrained(out / "base", safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # as `check` samples
    pipe.set_progress_bar_config(disable=True)
    features = load_feature_net(out / "feature_net.safetensors")
    return {
        "kid_base_vs_val_teacher": kid_base_vs_val_teacher(pipe, features, out),
        "kid_base_vs_val_teacher_with_literal_s1s2": kid_base_vs_val_teacher(
            pipe, features, out, world.INSTANCE_PROMPT
        ),
    }


@torch.no_grad()
def check(pipe, features: ToyFeatureNet, out: Path) -> dict:
    """Does the base draw the right shapes? Is the VAE's floor far below the base model's distance?"""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rows, shape_ok, colour_ok, n = [], 0, 0, 0
    for s, shape in enumerate(world.SHAPES):
        for c, colour in enumerate(world.COLOURS):
            gens = [torch.Generator().manual_seed(SEEDS["check"] * 1000 + k) for k in range(8)]
            imgs = pipe(
                [world.caption(shape, colour)] * 8, generator=gens, num_inference_steps=25, output_type="pt"
            ).images
            logits = features.logits(imgs)
            shape_ok += int((logits["shape"].argmax(1) == s).sum())
            colour_ok += int((logits["colour"].argmax(1) == c).sum())
            n += len(imgs)
            rows.append(imgs)
    from torchvision.utils import save_image

    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    grid = torch.cat(rows)
    save_image(
        F.interpolate(grid, scale_factor=2, mode="nearest"), docs / "toy_base_grid.png", nrow=8, padding=2
    )

    val = val_teacher(out)
    f_val = features(val)
    recon = vae_roundtrip(pipe.vae, val)
    return {
        "base_shape_accuracy": shape_ok / n,
        "base_colour_accuracy": colour_ok / n,
        "kid_base_vs_val_teacher": kid_base_vs_val_teacher(pipe, features, out),
        "kid_vae_floor_val_teacher": kid_from_features(f_val, features(recon)).kid_mean,
        "vae_recon_l1_val_teacher": float((recon - val).abs().mean()),
    }


def write_build_notes(out: Path, args, times: dict, checks: dict) -> None:
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    text = f"""# Toy world assets

Built by `python scripts/make_toy_assets.py --vae_steps {args.vae_steps} --unet_steps {args.unet_steps} \\
--feature_steps {args.feature_steps} --batch {args.batch}` on {time.strftime("%Y-%m-%d")},
{torch.get_num_threads()} CPU threads; seeds {json.dumps(SEEDS)}.

| part | time |
|---|---|
| VAE (generic codec, {args.vae_steps} steps at batch 32) | {times["vae_s"]:.0f} s |
| feature net ({args.feature_steps} steps) | {times["feature_net_s"]:.0f} s |
| UNet (base world, {args.unet_steps} steps) | {times["unet_s"]:.0f} s |
| total | {times["total_s"]:.0f} s |

Size on disk: {size / 2**20:.1f} MiB.

Checks (feature net heads and `toy` features; KID with one subset of the whole set):

```json
{json.dumps(checks, indent=2)}
```

`base_shape_accuracy`/`base_colour_accuracy`: the base model's samples for each of the 12 captions
"a painting of a <colour> <shape>" (8 seeds each), classified by the feature net.
`kid_vae_floor_val_teacher` (held-out teacher images vs their VAE reconstructions) must stay well below
`kid_base_vs_val_teacher` (base samples for the class prompt "{world.CLASS_PROMPT}" vs the same teacher
images; `--recheck_base_kid` recomputes it alone from the written assets): it is the
closest any fine-tuning of the UNet can get.
"""
    (out / "BUILD.md").write_text(text)


if __name__ == "__main__":
    main()
