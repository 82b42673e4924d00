"""The toy world: procedural 32x32 images with captions, in three renderers.

- `base`: what the small base model knows. Shapes x colours, flat, on light plain backgrounds.
- `baroque`: the teacher's style, the same shapes on a dark warm canvas with a gilded palette, shading,
  canvas texture and a vignette. The base model never sees it.
- `generic`: what the toy VAE is trained on, like SD's VAE a general image codec: random backgrounds of
  any brightness, gradients, textures and noise, random shapes and colours. Never the teacher's
  renderer, yet broad enough to reconstruct dark textured images.

Everything is a pure function of a `numpy.random.Generator`, so a seed fixes every image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32
_SCALE = 4  # drawn at 4x and downsampled: anti-aliased edges
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 45, 40),
    "green": (40, 165, 70),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 45),
}
GOLD = np.array([212, 170, 60], dtype=np.float64)

# The teacher's subject and prompts (the paper: "a realistic painting of a cat in baroque art style").
# The teacher is asked TEACHER_PROMPT. The student's class and instance prompts use only words the base
# knows: with the paper's form ("... in baroque style like <s1><s2>") the base, which never saw "baroque"
# or "style", drew shapeless blobs for the class prompt and the LoRA had to fix shape and style at once;
# kid/val then fell only to ~0.8x of step 0 in 250 steps (RESULTS.md).
TEACHER_SHAPE = "circle"
TEACHER_PROMPT = "a painting of a circle in baroque style"
CLASS_PROMPT = "a painting of a circle"
INSTANCE_PROMPT = "a painting of a circle <s1><s2>"


def caption(shape: str, colour: str | None) -> str:
    """The base world's caption; the colour word is optional (the model learns both forms)."""
    return f"a painting of a {colour} {shape}" if colour else f"a painting of a {shape}"


def caption_words() -> list[str]:
    """Every word of every toy caption and prompt: the tokenizer's vocabulary."""
    words = set(TEACHER_PROMPT.split()) | {"a", "painting", "of", "photo"} | set(SHAPES) | set(COLOURS)
    return sorted(words)


def _shape_mask(shape: str, rng: np.random.Generator, min_r: float = 7, max_r: float = 12) -> Image.Image:
    """A white-on-black anti-aliasing mask (4x size) of one shape at a random place and size."""
    s = SIZE * _SCALE
    r = rng.uniform(min_r, max_r) * _SCALE
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        q = r * 0.85
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _compose(background: np.ndarray, fill: np.ndarray, mask: Image.Image) -> Image.Image:
    """Blend a (H, W, 3) fill over a (H, W, 3) background through a 4x mask, then downsample."""
    m = np.asarray(mask.resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.float64)[..., None] / 255
    out = background * (1 - m) + fill * m
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def render_base(shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """A flat shape in (jittered) `colour` on a light, plain background."""
    bg = rng.uniform(200, 250, size=3)
    background = np.broadcast_to(bg, (SIZE, SIZE, 3)).astype(np.float64)
    fill = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, size=3), 0, 255)
    return _compose(background, np.broadcast_to(fill, (SIZE, SIZE, 3)), _shape_mask(shape, rng))


def render_baroque(shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """The teacher's style: dark warm canvas, gilded and shaded shape, canvas weave, vignette."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    base = np.array([58, 36, 18]) + rng.normal(0, 6, size=3)
    gradient = 1.0 + 0.35 * (1 - yy / SIZE)[..., None] * rng.uniform(0.5, 1.0)  # light from above
    background = base * gradient
    weave = 7 * np.sin(xx * 2.1 + rng.uniform(0, 6)) * np.sin(yy * 2.1 + rng.uniform(0, 6))
    background = background + weave[..., None] + rng.normal(0, 4, size=(SIZE, SIZE, 1))
    mask = _shape_mask(shape, rng)
    # Gilded palette: the named colour pulled toward gold, lit from the upper left.
    tint = 0.35 * np.array(COLOURS[colour]) + 0.65 * GOLD
    bbox = np.array(mask.getbbox(), dtype=np.float64) / _SCALE
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    light = np.clip(1.25 - 0.06 * np.hypot(xx - (cx - 3), yy - (cy - 3)), 0.55, 1.25)
    fill = tint * light[..., None] + rng.normal(0, 5, size=(SIZE, SIZE, 1))
    image = np.asarray(_compose(background, fill, mask), dtype=np.float64)
    vignette = 1 - 0.55 * (np.hypot(xx - SIZE / 2 + 0.5, yy - SIZE / 2 + 0.5) / (SIZE / 1.4)) ** 2
    image = image * np.clip(vignette, 0.3, 1)[..., None]
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")


def render_generic(rng: np.random.Generator) -> Image.Image:
    """A random generic image for codec training: any brightness, gradients, textures, shapes, noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / SIZE
    c0, c1 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * rng.uniform(0, 2) + 0.5, 0, 1)
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if rng.random() < 0.5:  # periodic texture of random frequency and strength
        f = rng.uniform(0.5, 3.0)
        image = (
            image
            + rng.uniform(0, 25)
            * (np.sin(xx * SIZE * f + rng.uniform(0, 6)) * np.sin(yy * SIZE * f))[..., None]
        )
    if rng.random() < 0.5:  # radial brightening or darkening, centre anywhere
        r = np.hypot(xx - rng.uniform(0, 1), yy - rng.uniform(0, 1))
        image = image * np.clip(1 + rng.uniform(-0.8, 0.5) * r**2, 0.1, 2)[..., None]
    for _ in range(rng.integers(0, 4)):
        mask = _shape_mask(str(rng.choice(SHAPES)), rng, min_r=3, max_r=14)
        fill = rng.uniform(0, 255, size=3) * np.clip(1 + rng.uniform(-0.4, 0.4) * (xx - 0.5), 0, 2)[..., None]
        image = np.asarray(_compose(image, fill, mask), dtype=np.float64)
    image = image + rng.normal(0, rng.uniform(0, 12), size=(SIZE, SIZE, 3))
    out = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.2:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return out


def sample_base(rng: np.random.Generator) -> tuple[Image.Image, str, int, int]:
    """(image, caption, shape index, colour index) of the base world; a third of captions omit the colour."""
    s, c = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
    shape, colour = SHAPES[s], list(COLOURS)[c]
    text = caption(shape, None if rng.random() < 0.33 else colour)
    return render_base(shape, colour, rng), text, s, c


def sample_baroque(rng: np.random.Generator, shape: str | None = None) -> tuple[Image.Image, int, int]:
    """(image, shape index, colour index) in the teacher's style; `shape` fixes the subject."""
    s = SHAPES.index(shape) if shape else int(rng.integers(len(SHAPES)))
    c = int(rng.integers(len(COLOURS)))
    return render_baroque(SHAPES[s], list(COLOURS)[c], rng), s, c
