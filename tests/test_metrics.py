"""KID / CMMD and their feature extractors (dallm.measure.kid), and the `dallm kid` command."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dallm.arch.tiny import make_tiny_images
from dallm.cli import main
from dallm.images import load_rgb
from dallm.measure.features import clean_resize
from dallm.measure.kid import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    build_feature_extractor,
    cmmd_from_features,
    features_of_dir,
    features_of_images,
    images_to_tensor,
    kid_from_features,
    resolve_inception_weights,
)

ROOT = Path(__file__).resolve().parents[1]
FEATURE = {"class_path": "feature_nets.ColourStats"}  # tests/feature_nets.py; tests/ is on sys.path
FEATURE_FLAG = json.dumps(FEATURE)  # the same as `--feature` takes it
KEYS = {"kid_mean", "kid_se", "kid_std", "n_real", "n_fake", "subset_size", "subsets", "feature", "note"}
RELATIVE_KEYS = {"kid_a", "kid_a_se", "kid_b", "kid_b_se", "diff", "diff_se", "z", "p_value"}
RELATIVE_KEYS |= {"n_real", "n_a", "n_b", "feature", "note"}


def kid_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `dallm kid ARGS` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(["kid", *args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# -------------------------------------------------------------------------------------- KID math


def test_kid_matches_torch_fidelity_on_the_same_features():
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    g = torch.Generator().manual_seed(0)
    real = torch.randn(20, 64, generator=g, dtype=torch.float64)
    fake = torch.randn(20, 64, generator=g, dtype=torch.float64) * 1.3 + 0.4
    ours = kid_from_features(real, fake, subset_size=20, subsets=1)
    peer = kid_features_to_metric(
        real,
        fake,
        kid_subsets=1,
        kid_subset_size=20,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        verbose=False,
    )[KEY_METRIC_KID_MEAN]
    assert peer > 0.05  # a real difference, so agreement is not two zeros
    assert ours.kid_mean == pytest.approx(peer, abs=1e-6, rel=1e-9)
    # float32 features give the same number (computed in float64 internally)
    assert kid_from_features(real.float(), fake.float(), 20, 1).kid_mean == pytest.approx(peer, rel=1e-5)


def test_kid_at_five_images_is_one_whole_set_subset_with_undefined_std():
    g = torch.Generator().manual_seed(1)
    r = kid_from_features(torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g))  # 1000 requested
    assert (r.n_real, r.n_fake, r.subset_size, r.subsets) == (5, 5, 5, 1)
    assert r.kid_std is None and math.isfinite(r.kid_mean)
    assert "every subset is the whole set" in r.note and "capped from 1000 to 5" in r.note
    assert r.to_dict()["kid_std"] is None


def test_kid_with_unequal_samples_has_a_real_std_and_is_seeded_without_touching_global_rng():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(10, 16, generator=g), torch.randn(30, 16, generator=g) + 0.3
    state = torch.get_rng_state()
    a = kid_from_features(real, fake, subset_size=10, subsets=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.subset_size == 10 and a.subsets == 20 and a.kid_std is not None and a.kid_std > 0
    assert a == kid_from_features(real, fake, subset_size=10, subsets=20, seed=3)
    b = kid_from_features(real, fake, subset_size=10, subsets=20, seed=4)
    # the subsets (and so kid_std) follow the seed; kid_mean and kid_se use the full sets and do not
    assert a.kid_std != b.kid_std and (a.kid_mean, a.kid_se) == (b.kid_mean, b.kid_se)


def test_kid_rejects_too_few_samples_and_bad_settings():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="at least 2 fake"):
        kid_from_features(x, x[:1])
    with pytest.raises(ValueError, match="--subset_size"):
        kid_from_features(x, x, subset_size=1)
    with pytest.raises(ValueError, match="differ in size"):
        kid_from_features(x, torch.randn(4, 9))


# ------------------------------------------------------------------------------------------- CMMD


def test_cmmd_matches_a_hand_computed_example():
    # X = {e1, e2}, Y = {e1, e1}; ||e1 - e2||^2 = 2, gamma = 1 / (2 * 10^2), a = exp(-2 * gamma):
    # mean K_xx = (2 + 2a) / 4, mean K_yy = 1, mean K_xy = (2 + 2a) / 4  ->  CMMD = 1000 * (1 - a) / 2
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # rows are L2-normalised first: [3, 0] -> e1
    expected = 1000 * (1 - math.exp(-0.01)) / 2
    assert cmmd_from_features(x, y) == pytest.approx(expected, rel=1e-12)
    assert cmmd_from_features(x, y, sigma=1.0, scale=1.0) == pytest.approx((1 - math.exp(-1.0)) / 2)


# ------------------------------------------------------------------------------------ extractors


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> dict[str, Path]:
    """Procedural sets: two halves of one dark distribution, and a light one."""
    root = tmp_path_factory.mktemp("images")
    dark = make_tiny_images(root / "dark", 40, seed=0, dark=True)
    for name, part in (("dark_a", dark[:20]), ("dark_b", dark[20:])):
        (root / name).mkdir()
        for p in part:
            p.rename(root / name / p.name)
    make_tiny_images(root / "light", 20, seed=1, dark=False)
    return {k: root / k for k in ("dark_a", "dark_b", "light")}


def test_clip_features_have_projection_dim_and_cmmd_separates_sets(tiny_clip_dir, image_sets):
    clip = build_feature_extractor(f"clip:{tiny_clip_dir}")
    images = torch.rand(3, 3, 40, 56)  # not square, not the model's size: resized and centre-cropped
    feats = clip(images)
    assert feats.shape == (3, 16) and feats.dtype == torch.float32
    assert clip.prepare(Image.new("RGB", (56, 40))).shape == (3, 32, 32)
    a = features_of_dir(image_sets["dark_a"], clip, batch_size=8)
    b = features_of_dir(image_sets["light"], clip, batch_size=8)
    assert cmmd_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    assert cmmd_from_features(a, b) > 1e-3


def test_clip_features_of_a_file_are_the_model_on_transformers_image_processor(tmp_path, tiny_clip_dir):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    ramp = torch.linspace(0, 1, 60)[:, None, None] * torch.linspace(0, 1, 90)[None, :, None]
    Image.fromarray((ramp * torch.tensor([255.0, 128.0, 60.0])).byte().numpy()).save(tmp_path / "g.png")
    clip = build_feature_extractor(f"clip:{tiny_clip_dir}")
    ours = features_of_dir(tmp_path, clip)  # file -> decode -> processor -> model
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(images=load_rgb(tmp_path / "g.png"), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        theirs = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()(pixel_values=pixels)
    assert torch.allclose(ours, theirs.image_embeds, atol=1e-5)
    assert not torch.allclose(ours, clip(torch.zeros(1, 3, 60, 90)), atol=1e-3)  # the control differs


def test_clip_normalisation_comes_from_preprocessor_config(tmp_path, tiny_clip_dir):
    default = build_feature_extractor(f"clip:{tiny_clip_dir}")
    assert list(default.processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    custom = tmp_path / "clip"
    custom.mkdir()
    for f in tiny_clip_dir.iterdir():
        (custom / f.name).write_bytes(f.read_bytes())
    (custom / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    clip = build_feature_extractor(f"clip:{custom}")
    assert list(clip.processor.image_mean) == [0.5] * 3 and list(clip.processor.image_std) == [0.25] * 3
    # the config has no sizes (the processor's default would be 224): the crop is the model's 32
    assert clip.prepare(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="--feature clip:"):
        build_feature_extractor(f"clip:{tmp_path / 'nothing'}")


def test_module_feature_output_is_validated():
    with pytest.raises(ValueError, match=r"--feature feature_nets.WrongShape.*\(N, D\)"):
        build_feature_extractor({"class_path": "feature_nets.WrongShape"})(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="--feature no_such_module_here.F: cannot import"):
        build_feature_extractor({"class_path": "no_such_module_here.F"})
    with pytest.raises(ValueError, match="--feature feature_nets.nope: cannot import"):
        build_feature_extractor({"class_path": "feature_nets.nope"})
    with pytest.raises(ValueError, match="--feature torch.nn.functional.relu: not an nn.Module class"):
        build_feature_extractor({"class_path": "torch.nn.functional.relu"})
    with pytest.raises(ValueError, match="--feature feature_nets.ColourStats: init_args {'dim': 3}"):
        build_feature_extractor({"class_path": "feature_nets.ColourStats", "init_args": {"dim": 3}})
    with pytest.raises(ValueError, match="unknown feature 'module:feature_nets:make_feature_net'"):
        build_feature_extractor("module:feature_nets:make_feature_net")  # the spec string before class_path


def test_toy_feature_net_separates_the_two_worlds():
    import numpy as np

    from dallm.toy import world

    net = build_feature_extractor("toy")
    rng = np.random.default_rng(0)
    base = images_to_tensor_from_pil([world.sample_base(rng)[0] for _ in range(20)])
    baroque = images_to_tensor_from_pil([world.sample_baroque(rng, "circle")[0] for _ in range(40)])
    f_base, f_baroque = net(base), net(baroque)
    assert f_base.shape == (20, 64) and torch.allclose(f_base.norm(dim=1), torch.ones(20), atol=1e-5)
    same = kid_from_features(f_baroque[:20], f_baroque[20:]).kid_mean
    different = kid_from_features(f_baroque[:20], f_base).kid_mean
    assert different > 10 * max(same, 1e-3)


def images_to_tensor_from_pil(images):
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255


def test_inception_weights_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_FILE}.*--weights PATH.*{INCEPTION_ENV}"):
        resolve_inception_weights()
    fake = tmp_path / INCEPTION_FILE
    fake.write_bytes(b"")
    assert resolve_inception_weights(str(fake)) == str(fake)
    monkeypatch.setenv(INCEPTION_ENV, str(fake))
    assert resolve_inception_weights() == str(fake)
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_ENV):
        resolve_inception_weights()


@pytest.mark.slow  # over a second: the full suite runs it, the fast loop stays under a minute
def test_inception_extractor_takes_unit_floats_and_returns_2048_features(tmp_path, monkeypatch):
    # Random weights of the right shape stand in for the real file (no download here): this checks the
    # wiring ([0, 1] floats -> uint8, torch-fidelity's tuple output), not the numbers.
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / INCEPTION_FILE
    torch.save(net.state_dict(), weights)
    inception = build_feature_extractor("inception", weights=str(weights))
    images = torch.rand(2, 3, 40, 48)
    feats = inception(images)
    assert inception.name == "inception" and feats.shape == (2, 2048) and feats.dtype == torch.float32
    # Each image: 8-bit, clean-fid's bicubic to 299x299 (per float channel), 8-bit again for the TF graph.
    pixels = [
        clean_resize(Image.fromarray(im), (299, 299))
        for im in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    ]
    ref = net(torch.from_numpy(np.stack(pixels)).round().byte().permute(0, 3, 1, 2))[0]
    # Randomly initialised features are tiny (~1e-8): compare relatively, against a wrong-input control.
    assert torch.allclose(feats, ref, rtol=1e-4, atol=0)
    assert not torch.allclose(net(torch.zeros_like(images, dtype=torch.uint8))[0], ref, rtol=1e-2, atol=0)


def test_images_to_tensor_resizes_each_image_only_to_the_given_size(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (7, 7), 128).save(tmp_path / "b.png")
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    t = images_to_tensor(paths, size=(10, 20))
    assert t.shape == (2, 3, 10, 20) and t.dtype == torch.float32
    assert t[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and 0.0 <= t.min() and t.max() <= 1.0
    assert images_to_tensor(paths, size=8).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"b\.png: 7x7 differs from .*a\.png's size"):
        images_to_tensor(paths)  # no image is resized to another file's size
    net = build_feature_extractor(FEATURE)
    pil = [Image.open(p).convert("RGB") for p in paths]
    assert features_of_images(pil[:1], net).shape == (1, 54)
    assert torch.allclose(features_of_images(t, net, batch_size=1), net(t))
    # this module declares no input size: each image keeps its own (20x10 and 7x7 in one call)
    assert torch.allclose(features_of_images(pil, net)[1], net(pil[1:]))


# ---------------------------------------------------------------------------------- control check


def test_kid_control_same_distribution_is_far_below_a_different_one(image_sets):
    # Paper section 2.3: two halves of one distribution are the zero reference a different one must beat.
    net = build_feature_extractor(FEATURE)
    feats = {k: features_of_dir(d, net, batch_size=8, flag=k) for k, d in image_sets.items()}
    same = kid_from_features(feats["dark_a"], feats["dark_b"], subset_size=10, subsets=50)
    other = kid_from_features(feats["dark_a"], feats["light"], subset_size=10, subsets=50)
    assert other.kid_mean > 0.01
    assert same.kid_mean < other.kid_mean / 3


# -------------------------------------------------------------------------------------- dallm kid


def test_dallm_kid_prints_one_json_object(capsys, image_sets):
    code, out, err = kid_cli(
        capsys, str(image_sets["dark_a"]), str(image_sets["light"]), "--feature", FEATURE_FLAG, "--subsets", "7"
    )
    assert code == 0, err
    result = json.loads(out)  # the whole of stdout is one JSON object
    assert set(result) == KEYS
    assert (result["n_real"], result["n_fake"], result["subset_size"], result["subsets"]) == (20, 20, 20, 1)
    assert result["kid_std"] is None and "whole set" in result["note"]
    assert result["feature"] == FEATURE["class_path"] and result["kid_mean"] > 0.01
    assert "dallm kid:" in err  # progress goes to stderr


def test_dallm_kid_prints_kid_se(capsys, image_sets):
    code, out, _ = kid_cli(capsys, str(image_sets["dark_a"]), str(image_sets["light"]), "--feature", FEATURE_FLAG)
    result = json.loads(out)
    assert code == 0 and result["kid_se"] is not None and 0 < result["kid_se"] < result["kid_mean"]


def test_dallm_kid_with_two_fake_folders_runs_the_relative_test(capsys, image_sets):
    real, near, far = (str(image_sets[k]) for k in ("dark_a", "dark_b", "light"))
    code, out, err = kid_cli(capsys, real, near, far, "--feature", FEATURE_FLAG)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == RELATIVE_KEYS
    assert (result["n_real"], result["n_a"], result["n_b"]) == (20, 20, 20)
    assert result["diff"] == pytest.approx(result["kid_a"] - result["kid_b"])
    assert result["diff"] < 0 and result["p_value"] < 0.01  # the other half of the dark set is closer
    code, out, _ = kid_cli(capsys, real, far, near, "--feature", FEATURE_FLAG)
    assert code == 0 and json.loads(out)["p_value"] > 0.99
    code, out, err = kid_cli(capsys, real, near, str(image_sets["dark_a"] / "missing"), "--feature", FEATURE_FLAG)
    assert code == 2 and out == "" and "FAKE_B_DIR: directory" in err.strip().splitlines()[-1]


def test_dallm_kid_help_comes_from_the_docstring(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["kid", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for text in (
        "relative KID test",
        "fake_b_dir",
        "A second directory of generated images",
        "--subset_size",
    ):
        assert text in out, text


@pytest.mark.slow
def test_dallm_kid_subprocess(image_sets):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "dallm", "kid", str(image_sets["dark_a"]), str(image_sets["dark_b"])]
    cmd += ["--feature", FEATURE_FLAG, "--subset_size", "10", "--subsets", "5", "--seed", "1"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == KEYS and out["subset_size"] == 10 and out["subsets"] == 5
    assert out["kid_std"] is not None and out["note"] is None


def _corrupt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corrupt"
    make_tiny_images(d, 3, seed=0)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", r"REAL_DIR: directory .*missing does not exist"),
        ("empty", r"REAL_DIR: no images in"),
        ("corrupt", r"broken\.png: cannot read image"),
        ("unknown_feature", r"--feature: unknown feature 'resnet'; valid forms: inception \| clip:"),
        ("inception_offline", rf"{INCEPTION_FILE}.*--weights PATH or set {INCEPTION_ENV}"),
        ("too_few", r"REAL_DIR: KID needs at least 2 images"),
        ("bad_subsets", r"--subsets must be >= 1, got 0"),
    ],
)
def test_dallm_kid_bad_input_is_one_error_line_and_exit_2(
    case, expected, capsys, tmp_path, monkeypatch, image_sets
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.delenv("DALLM_TRACEBACK", raising=False)
    good = str(image_sets["dark_b"])
    real, feature = str(image_sets["dark_a"]), FEATURE_FLAG
    if case == "missing":
        real = str(tmp_path / "missing")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        real = str(tmp_path / "empty")
    elif case == "corrupt":
        real = str(_corrupt_dir(tmp_path))
    elif case == "unknown_feature":
        feature = "resnet"
    elif case == "inception_offline":
        feature = "inception"
    elif case == "too_few":
        make_tiny_images(tmp_path / "one", 1)
        real = str(tmp_path / "one")
    extra = ["--subsets", "0"] if case == "bad_subsets" else []
    code, out, err = kid_cli(capsys, real, good, "--feature", feature, *extra)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("dallm: error: ")
    assert sum(line.startswith("dallm: error:") for line in lines) == 1
    assert "Traceback" not in err
    assert re.search(expected, lines[-1]), lines[-1]
