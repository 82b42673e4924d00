"""Image preparation for the feature extractors (dallm.measure.features): each image on its own, bounded memory.

KID of a folder must not depend on file names, order, or another image's size, and an image and its
pixel-replicated 4x copy must give the same features (the integer box shrink brings the copy back
exactly; the extractor's resize then sees the same pixels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dallm.arch.tiny import make_tiny_images
from dallm.cli import main
from dallm.measure import features
from dallm.measure.feature_spec import build_feature_extractor
from dallm.measure.features import (
    INCEPTION_SIZE,
    ModuleFeatures,
    clean_resize,
    decode_for,
    features_of_dir,
)
from dallm.measure.kid import kid_from_features

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from feature_nets import ColourStats  # noqa: E402


def replicate(path: Path, out: Path, k: int = 4) -> None:
    """Save `path`'s image k times larger by exact pixel replication (nearest neighbour) to `out`."""
    with Image.open(path) as im:
        im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST).save(out)


@pytest.fixture()
def folder(tmp_path) -> Path:
    d = tmp_path / "set"
    make_tiny_images(d, 8, seed=3)  # 32x32: the toy net's input size
    return d


def extractors(tiny_clip_dir):
    return {
        "toy": build_feature_extractor("toy"),
        "clip": build_feature_extractor(f"clip:{tiny_clip_dir}"),
        "module-32": ModuleFeatures(ColourStats(), "module:sized", input_size=32),
    }


def test_kid_of_a_folder_ignores_a_4x_copy_and_file_names(tmp_path, folder, tiny_clip_dir):
    other = tmp_path / "other"
    make_tiny_images(other, 8, seed=4, dark=False)
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in sorted(folder.iterdir()):
        (changed / p.name).write_bytes(p.read_bytes())
    replicate(folder / "000003.png", changed / "000003.png")  # 128x128 copy of a 32x32 image
    (changed / "000007.png").rename(changed / "0.png")  # now sorts first
    for name, net in extractors(tiny_clip_dir).items():
        ref = features_of_dir(other, net)
        base = kid_from_features(ref, features_of_dir(folder, net))
        moved = kid_from_features(ref, features_of_dir(changed, net))
        assert base.kid_mean > 1e-3, name  # a real distance, so equality is not two zeros
        assert moved.kid_mean == pytest.approx(base.kid_mean, abs=1e-6), name
        assert moved.kid_se == pytest.approx(base.kid_se, abs=1e-6), name


def test_a_4x_copy_of_a_non_square_image_prepares_identically(tmp_path, tiny_clip_dir):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    replicate(tmp_path / "a.png", tmp_path / "b.png")  # 128x192
    for name, net in extractors(tiny_clip_dir).items():
        a, b = net.load(tmp_path / "a.png"), net.load(tmp_path / "b.png")
        assert torch.equal(a, b), name
    # Inception's preparation (its network needs weights): the whole image to 299x299, clean-fid's resize
    Image.fromarray(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    replicate(tmp_path / "c.png", tmp_path / "d.png")
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    c, d = (clean_resize(decode_for(tmp_path / f, size), size) for f in ("c.png", "d.png"))
    assert np.array_equal(c, d)


def test_a_1x1_image_first_by_name_changes_no_other_image(tmp_path, folder, tiny_clip_dir):
    with_tiny = tmp_path / "with_tiny"
    with_tiny.mkdir()
    for p in folder.iterdir():
        (with_tiny / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (1, 1), (255, 0, 0)).save(with_tiny / "0.png")
    for name, net in extractors(tiny_clip_dir).items():
        base, more = features_of_dir(folder, net), features_of_dir(with_tiny, net)
        assert more.shape[0] == base.shape[0] + 1 and bool(torch.isfinite(more).all()), name
        assert torch.allclose(more[1:], base, atol=1e-6), name  # the others are as they were


def test_images_without_a_declared_size_keep_their_own(tmp_path):
    net = ModuleFeatures(ColourStats(), "module:own")
    make_tiny_images(tmp_path, 2, seed=0, size=16)
    Image.new("RGB", (7, 5), (10, 20, 30)).save(tmp_path / "x.png")
    feats = features_of_dir(tmp_path, net, batch_size=8)
    assert feats.shape == (3, 54)
    assert torch.allclose(feats[2, :3], torch.tensor([10, 20, 30]) / 255.0)  # its own pixels, unresized


def test_an_absurdly_large_image_is_one_error_line_naming_the_file(tmp_path, folder, capsys, monkeypatch):
    monkeypatch.setattr(features, "MAX_PIXELS", 32 * 32 - 1)  # as if every 32x32 image were huge
    monkeypatch.delenv("DALLM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["kid", str(folder), str(folder), "--feature", "toy"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("dallm: error: ") and "000000.png: image is 32x32" in line and "more than dallm decodes" in line


PROBE = """
import json, resource, sys
from dallm.measure.features import ModuleFeatures, features_of_paths
sys.path.insert(0, "tests")
from feature_nets import ColourStats
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
net = ModuleFeatures(ColourStats(), "module:sized", input_size=299)
features_of_paths([sys.argv[1]], net)  # warm up (allocator, lazy imports) on the 1x1 image
base, out = peak(), {}
for path in sys.argv[1:]:  # 1x1, then the JPEG, then the PNG: the peak only grows
    feats = features_of_paths([path], net)
    out[path] = {"peak_increase": peak() - base, "shape": list(feats.shape), "finite": bool(feats.isfinite().all())}
print(json.dumps(out))
"""


@pytest.mark.slow  # a subprocess, so the peak RSS is this decoding's alone
def test_memory_is_bounded_by_the_prepared_image_not_the_file(tmp_path):
    paths = [tmp_path / "tiny.png", tmp_path / "huge.jpg", tmp_path / "huge.png"]
    Image.new("RGB", (1, 1), (200, 180, 40)).save(paths[0])
    # 6000x6000: under the one pixel limit (dallm.images.MAX_IMAGE_PIXELS, 40 Mpx) that fit and kid share.
    image = Image.new("RGB", (6000, 6000), (200, 180, 40))
    image.paste((20, 40, 200), (2000, 2000, 4000, 4000))  # some structure; still quick to encode
    image.save(paths[1], quality=90)
    image.save(paths[2], compress_level=1)
    del image
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, paths)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for path in paths:
        assert result[str(path)]["shape"] == [1, 54] and result[str(path)]["finite"]
    # A 6000x6000 RGB image is 108 MB decoded; the old path (every image stacked at the first file's
    # size, then float32) needed several GB. Decoded once and shrunk in place, all three stay below 500 MB.
    assert result[str(paths[2])]["peak_increase"] < 500 * 2**20, result
