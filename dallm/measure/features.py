"""Image features for KID and CMMD: feature extractors, and each image prepared on its own as its extractor expects.

    file ──decode_for (bounded)──► RGB ──extractor.prepare──► input (3, H, W) ──extractor.extract (batch)──► (N, D)

Feature extractors (`dallm.measure.feature_spec.build_feature_extractor(spec)`, `--kid.feature`, `dallm kid --feature`):

    inception              torch-fidelity's Inception-v3 2048-d pool features (the KID of the literature)
    clip:<hub id | dir>    CLIP image embeddings (`image_embeds` of CLIPVisionModelWithProjection)
    toy                    the toy world's feature net (shipped with the toy world, dallm/toy)
    {class_path: pkg.mod.Class, init_args: {...}}
                           any nn.Module class mapping [0, 1] images (N, 3, H, W) to (N, D), built
                           with its init_args (jsonargparse's class_path form); an `input_size`
                           attribute (int or (H, W)) on the module asks for that size, else each image
                           keeps its own

Every image is decoded, converted to RGB and resized on its own, so a feature never depends on file
names, order, or the size of any other image. The resize follows clean-fid (Parmar et al. 2022, "On
Aliased Resizing and Surprising Subtleties in GAN Evaluation"): PIL's antialiased bicubic on each
channel in float, of the whole image to the extractor's input (Inception 299x299, as torch-fidelity's
network also resizes the whole image; the toy net's 32x32; a module's `input_size`). CLIP images go
through transformers' `CLIPImageProcessor` (shortest side, centre crop, normalisation). Large images
are first shrunk by an exact integer box filter (PIL `reduce`, JPEGs by libjpeg's DCT scaling when
over 16 Mpx), so memory is bounded by a batch of prepared images, not by the largest file, and an
image and its pixel-replicated k-times copy give identical features.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn

from dallm.images import MAX_IMAGE_PIXELS, check_image_size, list_images, to_rgb

# torch-fidelity's Inception-v3 (TF 2015-12-05 weights converted to PyTorch), as in its own URL_INCEPTION_V3.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
INCEPTION_ENV = "DALLM_INCEPTION_WEIGHTS"
INCEPTION_SIZE = 299

# Decoded pixels of one image: above, a file is refused. One limit for `dallm kid` and training (40 Mpx).
MAX_PIXELS = MAX_IMAGE_PIXELS
DRAFT_PIXELS = 2**24  # JPEGs above 16 Mpx are decoded at a reduced DCT scale (still >= the input size)
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height


# --------------------------------------------------------------------------------- preparation


def clean_resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB image -> (H, W, 3) float32 in [0, 255] at `size` (H, W): clean-fid's PIL bicubic per float channel.

    An image already at `size` is returned exactly (no resampling).
    """
    h, w = size
    if image.size == (w, h):
        return np.asarray(image, dtype=np.float32)
    channels = [
        np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.Resampling.BICUBIC))
        for c in np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    ]
    return np.stack(channels, axis=2).clip(0.0, 255.0)  # bicubic overshoots; pixels do not


def _reduce_factors(width: int, height: int, size: tuple[int, int] | None, crop: bool) -> tuple[int, int]:
    """Integer box-shrink factors (x, y) that keep the image at least as large as `size` (H, W) needs.

    `crop`: the shortest side goes to `size` before a centre crop; else the whole image is resized.
    """
    if size is None:
        return 1, 1
    # One factor for both axes keeps the aspect ratio, so a k-times copy of an image shrinks back to it
    # exactly whatever the later resize does.
    f = min(width, height) // min(size) if crop else min(width // size[1], height // size[0])
    return max(1, f), max(1, f)


def decode_for(path: str | Path, size: tuple[int, int] | None = None, crop: bool = False) -> Image.Image:
    """Decode one image file to RGB, shrunk by exact integer factors toward `size` (H, W) when much larger.

    Memory stays near the decoded file (a JPEG over 16 Mpx is decoded at a reduced DCT scale), and a file
    over MAX_PIXELS decoded pixels is refused. EXIF orientation is applied (as the image is displayed).

    Raises:
        ValueError: naming the file, for a corrupt, unreadable or absurdly large file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is the guard
            with Image.open(path) as im:
                swap = im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
                stored = None if size is None else (size[::-1] if swap else size)  # (H, W) before rotation
                if im.format == "JPEG" and im.width * im.height > DRAFT_PIXELS and stored is not None:
                    side = min(stored) if crop else None
                    im.draft("RGB", (side, side) if crop else (stored[1], stored[0]))
                check_image_size(path, im.size, MAX_PIXELS)  # the same limit and words as training
                im.load()
                fx, fy = _reduce_factors(im.width, im.height, stored, crop)
                if (fx, fy) != (1, 1):
                    if im.mode in ("RGBA", "LA"):
                        im = im.convert("RGBa")  # premultiplied: a box average of colours weighted by alpha
                    elif im.mode not in ("RGB", "L", "RGBa"):
                        im = to_rgb(im)
                    im = im.reduce((fx, fy))  # exact area average: a k-times pixel copy comes back exactly
                    if im.mode == "RGBa":
                        im = im.convert("RGBA")
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ValueError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, DecompressionBombError, ... for bad files
        raise ValueError(f"{path}: cannot read image: {' '.join(str(err).split())}") from err


def _to_pil(image: Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image, quantised as a PNG of it would be."""
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(array.cpu().numpy(), mode="RGB")


# ---------------------------------------------------------------------------------- extractors


class FeatureExtractor(nn.Module):
    """Maps images to (N, D) float32 features; each image is prepared on its own (`prepare`).

    Subclasses set `input_size` ((H, W), or None to keep each image's size) and `crop` (shortest side to
    the input size then a centre crop, instead of resizing the whole image), and implement `extract` on
    a batch of prepared inputs. `name` identifies the features in logs and in `dallm kid`'s output.
    """

    input_size: tuple[int, int] | None = None
    crop: bool = False

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    @property
    def device(self) -> torch.device:
        """The device of the first parameter or buffer (the CPU for a parameter-free extractor)."""
        t = next(iter(list(self.parameters()) + list(self.buffers())), None)
        return t.device if t is not None else torch.device("cpu")

    def prepare(self, image: Image.Image) -> Tensor:
        """One RGB image -> the network's input for it, (3, H, W): by default floats in [0, 1] at input_size."""
        size = self.input_size or (image.height, image.width)
        return torch.from_numpy(clean_resize(image, size)).permute(2, 0, 1).div_(255.0)  # (3, H, W)

    def load(self, path: str | Path) -> Tensor:
        """Decode one file (bounded memory) and prepare it: (3, H, W)."""
        return self.prepare(decode_for(path, self.input_size, self.crop))

    def extract(self, batch: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def run(self, inputs: Sequence[Tensor]) -> Tensor:
        """Features (N, D) of prepared inputs, batched by equal shape, in the given order."""
        out: list[Tensor] = []
        start = 0
        while start < len(inputs):  # consecutive inputs of one shape go through the network together
            end = start + 1
            while end < len(inputs) and inputs[end].shape == inputs[start].shape:
                end += 1
            batch = torch.stack(list(inputs[start:end])).to(self.device)
            out.append(self.extract(batch).float().cpu())
            start = end
        return torch.cat(out)

    def forward(self, images: Tensor | Sequence[Image.Image]) -> Tensor:
        """Features (N, D) of (N, 3, H, W) images in [0, 1] (taken as the PNGs they would be) or PIL images."""
        if isinstance(images, Tensor) and (images.dim() != 4 or images.shape[1] != 3):
            raise ValueError(f"{self.name}: expected images (N, 3, H, W), got shape {tuple(images.shape)}")
        pil = [_to_pil(im) if isinstance(im, Tensor) else im.convert("RGB") for im in images]
        return self.run([self.prepare(im) for im in pil])


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's Inception-v3 (`inception-v3-compat`), 2048-d pool features, on 299x299 inputs."""

    input_size = (INCEPTION_SIZE, INCEPTION_SIZE)

    def __init__(self, weights_path: str) -> None:
        super().__init__("inception")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )

    def prepare(self, image: Image.Image) -> Tensor:
        # The TF graph this mirrors takes 8-bit images; at 299x299 its own bilinear resize is the identity.
        pixels = clean_resize(image, self.input_size).round()
        return torch.from_numpy(pixels).to(torch.uint8).permute(2, 0, 1)  # (3, 299, 299)

    def extract(self, batch: Tensor) -> Tensor:
        return self.net(batch)[0]  # (N, 2048)


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_inception_weights(weights: str | None = None) -> str:
    """Path of the Inception-v3 weights: `weights`, else $DALLM_INCEPTION_WEIGHTS, else torch's hub cache.

    A missing cache file is downloaded when online (30 s socket timeout), never when HF_HUB_OFFLINE or
    TRANSFORMERS_OFFLINE is set, so an offline machine fails at once with a message naming the file.
    """
    for source, value in (("--weights", weights), (INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if value:
            if not Path(value).is_file():
                raise FileNotFoundError(f"{source}: Inception weights file {value} does not exist")
            return value
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return str(cached)
    need = (
        f"--feature inception needs the Inception-v3 weights file {INCEPTION_FILE} ({INCEPTION_URL}): "
        f"download it and pass --weights PATH or set {INCEPTION_ENV}=PATH (or put it at {cached})"
    )
    if _offline():
        raise FileNotFoundError(f"{need}; offline (HF_HUB_OFFLINE), so it is not downloaded")
    cached.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # torch.hub's urlopen has no timeout of its own: a dead network would hang
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
    except Exception as err:  # URLError, timeouts, HTTP errors: all mean "get the file yourself"
        raise FileNotFoundError(f"{need}; the download failed: {err}") from err
    finally:
        socket.setdefaulttimeout(previous)
    return str(cached)


class ClipFeatures(FeatureExtractor):
    """`image_embeds` of a transformers CLIPVisionModelWithProjection, prepared by its CLIPImageProcessor."""

    crop = True

    def __init__(self, source: str) -> None:
        super().__init__(f"clip:{source}")
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ValueError(f"--feature clip:{source}: cannot load a CLIP vision model: {err}") from err
        self.model.eval()
        s = int(self.model.config.image_size)
        try:  # the model's own preprocessing (mean, std, resample) when it ships one
            self.processor = CLIPImageProcessor.from_pretrained(source)
        except (OSError, ValueError):  # none: OpenAI CLIP's
            self.processor = CLIPImageProcessor()
        # The crop must be what the vision tower takes; a config without sizes would default to 224.
        if (self.processor.crop_size["height"], self.processor.crop_size["width"]) != (s, s):
            self.processor = CLIPImageProcessor(
                **{
                    **self.processor.to_dict(),
                    "size": {"shortest_edge": s},
                    "crop_size": {"height": s, "width": s},
                }
            )
        self.input_size = (s, s)

    def prepare(self, image: Image.Image) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, S, S), normalised

    def extract(self, batch: Tensor) -> Tensor:
        return self.model(pixel_values=batch.to(self.model.dtype)).image_embeds  # (N, projection_dim)


class ModuleFeatures(FeatureExtractor):
    """A user's nn.Module mapping [0, 1] images to (N, D); its output shape is checked on every call.

    `input_size` (int or (H, W)), or else the module's own `input_size` attribute, is the size each image
    is resized to; without either, images keep their own sizes (and are batched by size).
    """

    def __init__(self, net: nn.Module, name: str, input_size: int | tuple[int, int] | None = None) -> None:
        super().__init__(name)
        if not isinstance(net, nn.Module):
            raise ValueError(f"--feature {name}: expected an nn.Module, got {type(net).__name__}")
        self.net = net.eval()
        size = input_size if input_size is not None else getattr(net, "input_size", None)
        if isinstance(size, int):
            size = (size, size)
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"--feature {name}: input_size must be an int or (H, W) >= 1, got {size}")
        self.input_size = None if size is None else (int(size[0]), int(size[1]))

    def extract(self, batch: Tensor) -> Tensor:
        out = self.net(batch)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != batch.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"--feature {self.name}: the module must map images (N, 3, H, W) to features (N, D); "
                f"for N={batch.shape[0]} it returned {got}"
            )
        return out


# ------------------------------------------------------------------------------------- streams


def features_of_images(
    images: Sequence[Image.Image] | Tensor, extractor: FeatureExtractor, batch_size: int = 32
) -> Tensor:
    """Features (N, D) float32 on the CPU of PIL images or an (N, 3, H, W) tensor in [0, 1], in batches."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        raise ValueError("features_of_images: no images given")
    extractor.eval()
    return torch.cat([extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def features_of_paths(
    paths: Sequence[str | Path], extractor: FeatureExtractor, batch_size: int = 32
) -> Tensor:
    """Features (N, D) of image files, each decoded and prepared on its own, `batch_size` in memory at once."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if not paths:
        raise ValueError("features_of_paths: no image paths given")
    extractor.eval()
    return torch.cat(
        [
            extractor.run([extractor.load(p) for p in paths[i : i + batch_size]])
            for i in range(0, len(paths), batch_size)
        ]
    )


def features_of_dir(
    directory: str | Path, extractor: FeatureExtractor, batch_size: int = 32, flag: str = "directory"
) -> Tensor:
    """Features (N, D) of the images directly inside `directory`, decoded one batch at a time.

    `flag` names the directory's CLI flag or argument in errors (missing, empty, corrupt file).
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    return features_of_paths(list_images(directory, flag), extractor, batch_size)


def images_to_tensor(paths: Sequence[str | Path], size: int | tuple[int, int] | None = None) -> Tensor:
    """Decode image files into (N, 3, H, W) floats in [0, 1], each resized on its own to `size` ((H, W) or a side).

    Without `size` every file must already have one size (no image is resized to another's).

    Raises:
        ValueError: naming a corrupt or unreadable file, or the first file whose size differs.
    """
    if not paths:
        raise ValueError("images_to_tensor: no image paths given")
    if isinstance(size, int):
        size = (size, size)
    out = []
    for p in paths:
        image = decode_for(p, size)
        if size is None and out and (image.height, image.width) != tuple(out[0].shape[1:]):
            raise ValueError(
                f"{p}: {image.width}x{image.height} differs from {paths[0]}'s size; pass a size to resize each"
            )
        out.append(
            torch.from_numpy(clean_resize(image, size or (image.height, image.width))).permute(2, 0, 1)
        )
    return torch.stack(out).div_(255.0)  # (N, 3, H, W)
