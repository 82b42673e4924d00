"""Image files: listing a directory, decoding any file to RGB, resizing the short side.

Shared by training (`dallm.data.dataset`), measurement (`dallm.measure.kid`) and collection (`dallm teacher
--backend folder`), so a file means the same pixels everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dallm.errors import DallmError
from dallm.manifest import IMAGE_EXTENSIONS

# Largest image dallm decodes: 40 megapixels (a 7000x5700 photo). Training runs at 512-1024 px; an 8000x8000
# file decodes to 192 MB of RGB and several times that as float tensors (ArrayMemoryError on small hosts).
MAX_IMAGE_PIXELS = 40_000_000


def check_image_size(path: str | Path, size: tuple[int, int], limit: int | None = None) -> None:
    """Refuse an image larger than MAX_IMAGE_PIXELS (or `limit`) from its header size, before decoding it.

    Called by `load_rgb` between `Image.open` (which reads only the header) and `im.load()`, by
    `dallm.measure.features.decode_for` (`dallm kid`, KID rounds) and by preflight for the teacher images.
    """
    width, height = size
    limit = MAX_IMAGE_PIXELS if limit is None else limit
    if width * height > limit:
        raise DallmError(
            f"{path}: image is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than dallm "
            f"decodes ({limit / 1e6:.0f}); downscale it (training uses at most ~1024 px)"
        )



def list_images(directory: str | Path, flag: str) -> list[Path]:
    """Image files directly inside `directory` (not recursive, so `val/` stays out), sorted by name.

    `flag` is the CLI flag that named the directory, so errors tell the user what to change.
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"{flag}: directory {directory} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{flag}: {directory} is not a directory")
    # Hidden names are temp files of save_png_atomic or macOS "._x.png" resource forks, not images.
    paths = sorted(
        (
            p
            for p in d.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        ),
        key=lambda p: p.name,
    )
    if not paths:
        raise ValueError(
            f"{flag}: no images in {directory} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            arr = np.nan_to_num(arr)
            # Float images are usually in [0, 1]; anything larger is taken as already 0..255.
            if arr.size and arr.max() <= 1.0:
                arr = arr * 255.0
        else:
            # 16-bit data (I;16*, and mode "I" as Pillow opens 16-bit PNG/TIFF): 65535 -> 255, not a clip at 255.
            arr = np.clip(arr, 0, 65535) / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        # Transparent pixels often hold junk colour (black); the teacher never saw them, white is neutral.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully and return it in mode RGB (alpha composited on white).

    Raises:
        ValueError: naming the file, for a corrupt, truncated or non-image file.
    """
    try:
        with Image.open(path) as im:
            check_image_size(path, im.size)  # from the header, before a huge decode runs out of memory
            im.load()  # decodes now, so a truncated file fails here and not mid-training
            im = ImageOps.exif_transpose(im)  # a phone photo is trained upright, as it is displayed
            return to_rgb(im)
    except DallmError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise ValueError(f"{path}: cannot read image: {err}") from err


def resize_shortest_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize (bilinear; PIL antialiases when shrinking) so that the shorter side is `resolution`."""
    w, h = image.size
    if min(w, h) == resolution:
        return image
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)
