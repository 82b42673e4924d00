"""Tests of dallm.images: listing, decoding any file to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dallm.arch.tiny import make_tiny_images
from dallm.images import list_images, load_rgb


def _rgb(path: Path) -> np.ndarray:
    im = load_rgb(path)
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_load_rgb_composites_alpha_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    rgba.save(tmp_path / "rgba.png")
    out = _rgb(tmp_path / "rgba.png")[0]
    assert out[0].tolist() == [255, 255, 255]  # fully transparent red -> white, not red or black
    assert out[1].tolist() == [0, 0, 255]
    assert abs(out[2] - 127).max() <= 1  # half-transparent black over white

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (100, 255)])
    la.save(tmp_path / "la.png")
    assert _rgb(tmp_path / "la.png")[0].tolist() == [[255, 255, 255], [100, 100, 100]]


def test_load_rgb_palette_with_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    p.putdata([0, 1])
    p.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert _rgb(tmp_path / "p.png")[0].tolist() == [[255, 255, 255], [255, 0, 0]]


def test_load_rgb_gray_and_cmyk(tmp_path):
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert (_rgb(tmp_path / "l.png") == 77).all()

    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])
    cmyk.save(tmp_path / "cmyk.tiff")
    assert Image.open(tmp_path / "cmyk.tiff").mode == "CMYK"
    out = _rgb(tmp_path / "cmyk.tiff")[0]
    assert out[0].tolist() == [255, 255, 255]
    assert out[1].tolist() == [0, 255, 255]  # full cyan


def test_load_rgb_scales_16_bit_and_float(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    out = _rgb(tmp_path / "i16.png")[0, :, 0]
    assert out.tolist() == [0, 128, 255, 4]  # scaled by 255/65535, not clipped at 255

    Image.fromarray(np.array([[0, 40000]], dtype=np.int32), mode="I").save(tmp_path / "i32.tiff")
    assert _rgb(tmp_path / "i32.tiff")[0, :, 0].tolist() == [0, 156]

    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tiff")
    assert Image.open(tmp_path / "f.tiff").mode == "F"
    assert _rgb(tmp_path / "f.tiff")[0, :, 0].tolist() == [0, 128, 255]


def test_load_rgb_rejects_truncated_and_non_images(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png: cannot read image"):
        load_rgb(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"text\.png: cannot read image"):
        load_rgb(tmp_path / "text.png")


def test_list_images_sorted_and_flat(tmp_path):
    teacher = tmp_path / "teacher"
    make_tiny_images(teacher, 3)
    make_tiny_images(teacher / "val", 2)
    (teacher / "b.JPG").write_bytes((teacher / "000000.png").read_bytes())
    (teacher / ".000009.png.tmp").write_bytes(b"")
    names = [p.name for p in list_images(teacher, "--x")]
    assert names == ["000000.png", "000001.png", "000002.png", "b.JPG"]
