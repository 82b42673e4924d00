"""A tiny Stable-Diffusion-architecture pipeline built in code, for tests and `configs/tiny.yaml`.

It has every part SD v1-5 has (VAE, CLIP text encoder, CLIP BPE tokenizer, UNet with cross-attention,
scheduler) at toy size and random weights, and is saved in the diffusers layout so that it is loaded
through exactly the same `from_pretrained(dir)` path as the real model. It learns nothing useful: it
exists so that every code path runs offline in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from dallm.manifest import save_pretrained, slot_name

# Words the tiny tokenizer knows as whole tokens; anything else falls back to single characters.
TINY_WORDS = (
    "a an the of in like and with photo realistic painting cat dog baroque art style shape "
    "circle square triangle red green blue gold dark picture"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of GPT-2/CLIP byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_bpe_files(out_dir: Path, words: tuple[str, ...] | list[str] = TINY_WORDS) -> None:
    """Write `vocab.json` + `merges.txt` of a CLIP BPE that knows `words` as single tokens."""
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        # Left-to-right merges: enough to make each word one token.
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            joined = parts[0] + parts[1]
            vocab.setdefault(joined, len(vocab))
            parts = [joined] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0, resolution: int = 32):
    """Build a tiny SD pipeline with random weights, save it to `out_dir` (diffusers layout), return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    bpe_dir = out_dir / "_bpe"
    write_clip_bpe_files(bpe_dir)
    tokenizer = CLIPTokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"), model_max_length=77)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Two VAE blocks: 32x32 pixels -> 16x16x4 latents (SD's VAE has four: 512 -> 64).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    # Cross-attention at both levels so LoRA reaches self- and cross-attention everywhere, like SD.
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    from dallm.base import pipeline_from_parts

    pipe = pipeline_from_parts(tokenizer, text_encoder, vae, unet, scheduler)
    save_pretrained(pipe, out_dir)
    for f in bpe_dir.iterdir():
        f.unlink()
    bpe_dir.rmdir()
    return pipe


def make_tiny_images(
    out_dir: str | Path, n: int, seed: int = 0, size: int = 32, dark: bool = True
) -> list[Path]:
    """Draw `n` small procedural images (a gilded shape on a dark warm ground when `dark`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        bg = (rng.randint(20, 60), rng.randint(10, 35), rng.randint(0, 20)) if dark else (230, 230, 230)
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        fill = (rng.randint(180, 240), rng.randint(130, 180), rng.randint(20, 60))
        if i % 2:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        path = out_dir / slot_name(i)
        img.save(path)
        paths.append(path)
    return paths


class TinyFeatureNet(torch.nn.Module):
    """A fixed, randomly initialised conv net: the KID feature space of the tiny world (`configs/tiny.yaml`).

    Random features separate colour and layout well enough to show KID moving on tiny models; they mean
    nothing beyond that. Features are L2-normalised so KID stays on a readable scale.
    """

    def __init__(self, seed: int = 0, dim: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(16, dim, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        x = torch.relu(self.conv1(x * 2 - 1))  # (N, 16, 16, 16)
        x = torch.relu(self.conv2(x))  # (N, D, 8, 8)
        feats = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)  # (N, 2D)
        return torch.nn.functional.normalize(feats, dim=1)


def feature_net() -> TinyFeatureNet:
    """The tiny world's feature net (`--kid.feature {class_path: dallm.arch.tiny.TinyFeatureNet}`), in eval mode."""
    return TinyFeatureNet().eval()
