"""Tests of dallm.data, dallm.manifest and generate_with_pipeline: decoding, transforms, the step stream, the DataModule, priors."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from dallm.data import (
    DallmDataModule,
    StepSampler,
    TeacherPriorDataset,
    collate,
    list_images,
    load_rgb,
    preprocess,
)
from dallm.manifest import append_manifest, read_manifest, save_png_atomic
from dallm.teacher import generate_with_pipeline
from dallm.tiny import make_tiny_images

CLASS_PROMPT = "a painting of a cat"


def teacher_dir(tmp_path: Path, n: int = 6, name: str = "teacher") -> Path:
    make_tiny_images(tmp_path / name, n)
    return tmp_path / name


def datamodule(teacher: Path, **kwargs) -> DallmDataModule:
    kwargs.setdefault("resolution", 16)
    return DallmDataModule(teacher_dir=str(teacher), **kwargs)


# ------------------------------------------------------------------------------------- load_rgb


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


# ----------------------------------------------------------------------------------- preprocess


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_preprocess_shape_range_and_determinism():
    image = _noise_image(48, 24)
    out = preprocess(image, 16, center_crop=False, random_flip=True, seed=3)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and out.min() < -0.5 and out.max() > 0.5
    assert torch.equal(out, preprocess(image, 16, center_crop=False, random_flip=True, seed=3))
    # Random crops of a 32x16 resize: different seeds land on different offsets.
    crops = {
        preprocess(image, 16, center_crop=False, random_flip=False, seed=s).sum().item() for s in range(8)
    }
    assert len(crops) > 2
    centre = [preprocess(image, 16, center_crop=True, random_flip=False, seed=s) for s in range(3)]
    assert all(torch.equal(centre[0], c) for c in centre)
    square = _noise_image(48, 16)  # short side already 16: no resize, so the crop is exact
    middle = torch.from_numpy(np.asarray(square)[:, 16:32].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(preprocess(square, 16, center_crop=True, random_flip=False, seed=0), middle)
    flips = [preprocess(image, 16, center_crop=True, random_flip=True, seed=s) for s in range(16)]
    assert any(torch.equal(f, centre[0].flip(-1)) for f in flips) and any(
        torch.equal(f, centre[0]) for f in flips
    )


def test_resolution_must_be_multiple_of_8(tmp_path):
    with pytest.raises(ValueError, match=r"--data\.resolution"):
        datamodule(teacher_dir(tmp_path), resolution=30)


# ---------------------------------------------------------------------------------- StepSampler


def test_step_sampler_deterministic_and_resume_is_tail():
    full = list(StepSampler(7, 3, seed=5, start_batch=0, total_batches=10))
    assert full == list(StepSampler(7, 3, seed=5, start_batch=0, total_batches=10))
    assert full != list(StepSampler(7, 3, seed=6, start_batch=0, total_batches=10))
    for k in (1, 4, 9):
        assert list(StepSampler(7, 3, seed=5, start_batch=k, total_batches=10)) == full[k * 3 :]
    assert len({aug for _, aug in full}) == len(full)  # every position gets its own augmentation


def test_step_sampler_epochs_cover_every_index_once():
    n = 7
    stream = [i for i, _ in StepSampler(n, 1, seed=0, start_batch=0, total_batches=4 * n)]
    epochs = [stream[e * n : (e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_step_sampler_ranks_are_disjoint_shards_of_the_stream():
    n, b, batches = 10, 2, 6
    single = list(StepSampler(n, b, seed=1, start_batch=0, total_batches=2 * batches))
    ranks = [
        StepSampler(n, b, seed=1, start_batch=0, total_batches=batches, world_size=2, rank=r) for r in (0, 1)
    ]
    positions = [[s.position(q, j) for q in range(batches) for j in range(b)] for s in ranks]
    assert not set(positions[0]) & set(positions[1])
    assert sorted(positions[0] + positions[1]) == list(range(2 * batches * b))
    # Interleaving the ranks' batches reproduces the single-process stream item for item.
    per_rank = [list(s) for s in ranks]
    merged = [x for q in range(batches) for r in (0, 1) for x in per_rank[r][q * b : (q + 1) * b]]
    assert merged == single


def test_step_sampler_len_counts_the_whole_run():
    # Lightning restores its in-epoch batch counter on resume; the length must match that count.
    assert len(StepSampler(5, 3, seed=0, start_batch=4, total_batches=10)) == 30
    assert len(list(StepSampler(5, 3, seed=0, start_batch=4, total_batches=10))) == 18


class _Recorder(pl.LightningModule):
    """Trains one scalar and records a fingerprint of every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(round(batch["pixel_values"].sum().item(), 3))
        return (self.w - batch["pixel_values"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_mid_run_continues_the_stream(tmp_path):
    teacher = teacher_dir(tmp_path, 5)

    def fit(name: str, ckpt_path: str | None = None) -> _Recorder:
        model = _Recorder()
        trainer = pl.Trainer(
            max_steps=6,
            accumulate_grad_batches=2,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            default_root_dir=tmp_path / name,
            callbacks=[ModelCheckpoint(tmp_path / name, "{step}", every_n_train_steps=1, save_top_k=-1)],
        )
        dm = datamodule(teacher, batch_size=2, center_crop=False, random_flip=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        assert not [w for w in caught if "not resumable" in str(w.message)]
        return model

    full = fit("full")
    # Resume after step 1 (2 of 12 batches): fewer done than left, where a loader length of only the
    # remaining batches would end Lightning's epoch early and replay the tail.
    resumed = fit("resumed", str(tmp_path / "full" / "step=1.ckpt"))
    assert len(full.seen) == 12
    assert resumed.seen == full.seen[2:]
    assert resumed.w.item() == full.w.item()


def test_step_loader_warns_when_resumed_with_other_data(tmp_path):
    dm = datamodule(teacher_dir(tmp_path, 3))
    dm.setup("fit")
    loader = dm.make_train_dataloader(dm.make_train_sampler(0, 2))
    state = loader.state_dict()
    loader.load_state_dict(state)  # same stream: silent
    with pytest.warns(UserWarning, match=r"different training stream.*'n': '4 -> 3'"):
        loader.load_state_dict({**state, "n": 4})


def test_train_dataloader_needs_max_steps(tmp_path):
    dm = datamodule(teacher_dir(tmp_path, 3))
    dm.setup("fit")
    dm.trainer = SimpleNamespace(
        max_steps=-1, global_step=0, accumulate_grad_batches=1, world_size=1, global_rank=0
    )
    with pytest.raises(ValueError, match=r"--trainer\.max_steps must be set"):
        dm.train_dataloader()
    dm.trainer = SimpleNamespace(
        max_steps=5, global_step=2, accumulate_grad_batches=3, world_size=2, global_rank=1
    )
    sampler = dm.train_dataloader().sampler
    assert (sampler.start_batch, sampler.total_batches, sampler.world_size, sampler.rank) == (6, 15, 2, 1)


# ----------------------------------------------------------------------------- DataModule errors


def test_teacher_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data\.teacher_dir: directory .*nope does not exist"):
        datamodule(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"--data\.teacher_dir: no images in .*empty.*\.png"):
        datamodule(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"--data\.num_teacher_images=9 .* only 6"):
        datamodule(teacher_dir(tmp_path), num_teacher_images=9)


def test_list_images_sorted_and_flat(tmp_path):
    teacher = teacher_dir(tmp_path, 3)
    make_tiny_images(teacher / "val", 2)
    (teacher / "b.JPG").write_bytes((teacher / "000000.png").read_bytes())
    (teacher / ".000009.png.tmp").write_bytes(b"")
    names = [p.name for p in list_images(teacher, "--x")]
    assert names == ["000000.png", "000001.png", "000002.png", "b.JPG"]


def test_corrupt_teacher_image_fails_in_setup_naming_file(tmp_path):
    teacher = teacher_dir(tmp_path, 3)
    (teacher / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dm = datamodule(teacher)
    with pytest.raises(ValueError, match=r"000001\.png: cannot read image"):
        dm.setup("fit")


def test_prior_dir_required_and_writable(tmp_path):
    teacher = teacher_dir(tmp_path)
    with pytest.raises(ValueError, match=r"--data\.prior_dir is required"):
        datamodule(teacher, class_prompt=CLASS_PROMPT)
    (tmp_path / "file.txt").write_text("x")
    bad = tmp_path / "file.txt" / "sub"  # under a regular file: cannot be created, even as root
    dm = datamodule(teacher, class_prompt=CLASS_PROMPT, prior_dir=str(bad))
    with pytest.raises(OSError, match=r"--data\.prior_dir: cannot create or write .*file\.txt/sub"):
        dm.prepare_data()


def test_prior_manifest_of_other_prompt_is_refused(tmp_path):
    prior = tmp_path / "prior"
    prior.mkdir()
    append_manifest(prior, {"file": "000000.png", "prompt": "a photo of a dog", "model": "m"})
    dm = datamodule(teacher_dir(tmp_path), class_prompt=CLASS_PROMPT, prior_dir=str(prior))
    with pytest.raises(ValueError, match=r"a photo of a dog.*choose another --data\.prior_dir"):
        dm.prepare_data()


def test_prior_manifest_of_other_model_is_refused(tmp_path):
    prior = tmp_path / "prior"
    prior.mkdir()
    append_manifest(prior, {"file": "000000.png", "prompt": CLASS_PROMPT, "model": "some/other-model"})
    dm = datamodule(
        teacher_dir(tmp_path),
        class_prompt=CLASS_PROMPT,
        prior_dir=str(prior),
        pretrained_model_name_or_path="base/model",
    )
    with pytest.raises(ValueError, match=r"some/other-model.*choose another --data\.prior_dir"):
        dm.prepare_data()


def test_val_options_conflict(tmp_path):
    teacher = teacher_dir(tmp_path)
    with pytest.raises(ValueError, match=r"--data\.val_teacher_dir and --data\.num_val_images"):
        datamodule(teacher, val_teacher_dir=str(teacher_dir(tmp_path, 2, "v")), num_val_images=1)


# ------------------------------------------------------------------------------ held-out splits


def test_num_val_images_holds_out_the_last_images(tmp_path):
    teacher = teacher_dir(tmp_path, 6)
    dm = datamodule(teacher, num_val_images=2, num_teacher_images=3)
    assert [p.name for p in dm.val_teacher_paths] == ["000004.png", "000005.png"]
    assert [p.name for p in dm.train_teacher_paths] == ["000000.png", "000001.png", "000002.png"]
    with pytest.raises(ValueError, match=r"--data\.num_teacher_images=5 .* only 4"):
        datamodule(teacher, num_val_images=2, num_teacher_images=5)

    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["seeds"].tolist() == [0] and batch["is_prior"].tolist() == [False]
    assert len(dm.val_dataloader()) == 2
    first = next(iter(dm.val_dataloader()))
    assert torch.equal(first["pixel_values"], batch["pixel_values"])  # fixed order, no augmentation


def test_val_subfolder_is_picked_up(tmp_path):
    teacher = teacher_dir(tmp_path, 4)
    assert datamodule(teacher).val_dataloader() == []
    make_tiny_images(teacher / "val", 2, seed=1)
    dm = datamodule(teacher)
    assert [p.parent.name for p in dm.val_teacher_paths] == ["val", "val"]
    assert len(dm.train_teacher_paths) == 4
    assert not {p.resolve() for p in dm.val_teacher_paths} & {p.resolve() for p in dm.train_teacher_paths}


# ----------------------------------------------------------------------------- prior generation


def test_prior_generation_is_cached_and_extended(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import dallm.data as data

    calls = []
    real = data.generate_with_pipeline
    monkeypatch.setattr(
        data, "generate_with_pipeline", lambda *a, **k: calls.append(k["seeds"]) or real(*a, **k)
    )
    prior = tmp_path / "prior"
    kwargs = dict(
        class_prompt=CLASS_PROMPT,
        prior_dir=str(prior),
        num_prior_images=3,
        prior_generation_steps=2,
        prior_batch_size=2,
        resolution=32,
        pretrained_model_name_or_path=str(tiny_model_dir),
    )
    teacher = teacher_dir(tmp_path)
    datamodule(teacher, **kwargs).prepare_data()
    assert "prior: 0 of 3 class images present" in capsys.readouterr().out
    files = sorted(p.name for p in prior.glob("*.png"))
    assert files == ["000000.png", "000001.png", "000002.png"]
    records = read_manifest(prior)
    assert [r["seed"] for r in records] == [0, 1, 2] and [r["file"] for r in records] == files
    for r in records:
        assert r["prompt"] == CLASS_PROMPT and r["scheduler"] == "DDIMScheduler" and r["steps"] == 2
        assert r["model"] == str(tiny_model_dir.resolve()) and r["size"] == "32x32"
        assert r["sha256"] == hashlib.sha256((prior / r["file"]).read_bytes()).hexdigest()
    mtimes = {p.name: p.stat().st_mtime_ns for p in prior.glob("*.png")}
    manifest = (prior / "manifest.jsonl").read_bytes()

    datamodule(teacher, **kwargs).prepare_data()
    assert len(calls) == 1
    assert {p.name: p.stat().st_mtime_ns for p in prior.glob("*.png")} == mtimes
    assert (prior / "manifest.jsonl").read_bytes() == manifest
    assert "prior: 3 of 3 class images present" in capsys.readouterr().out

    datamodule(teacher, **{**kwargs, "num_prior_images": 4}).prepare_data()
    assert calls[-1] == [3]
    assert [r["seed"] for r in read_manifest(prior)] == [0, 1, 2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in prior.glob("*.png") if p.name in mtimes} == mtimes


def test_generation_same_seed_same_image_any_batch_size(tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    args = dict(num_inference_steps=2, guidance_scale=7.5, height=32, width=32, model="tiny", progress=False)
    a = generate_with_pipeline(pipe, "a red circle", tmp_path / "a", [5, 6, 7], 0, batch_size=3, **args)
    b = generate_with_pipeline(pipe, "a red circle", tmp_path / "b", [7], 2, batch_size=1, **args)
    assert [p.name for p in a] == ["000000.png", "000001.png", "000002.png"] and b[0].name == "000002.png"
    diff = np.abs(np.asarray(Image.open(a[2])).astype(int) - np.asarray(Image.open(b[0])).astype(int))
    assert diff.max() <= 1  # batched kernels may round differently; the noise is the same
    other = np.asarray(Image.open(a[0])).astype(int)
    assert np.abs(other - np.asarray(Image.open(b[0])).astype(int)).max() > 10


# -------------------------------------------------------------------------------------- batches


def _fake_prior_dir(tmp_path: Path, n: int) -> Path:
    prior = tmp_path / "prior"
    for p in make_tiny_images(prior, n, seed=7, dark=False):
        append_manifest(prior, {"file": p.name, "prompt": CLASS_PROMPT, "model": "", "seed": int(p.stem)})
    return prior


def test_train_batch_with_prior_preservation(tmp_path):
    teacher = teacher_dir(tmp_path, 3)
    prior = _fake_prior_dir(tmp_path, 5)
    dm = datamodule(
        teacher, class_prompt=CLASS_PROMPT, prior_dir=str(prior), num_prior_images=5, batch_size=2
    )
    assert dm.with_prior_preservation
    dm.prepare_data()  # everything present: nothing to generate, no model needed
    dm.setup("fit")
    loader = dm.make_train_dataloader(dm.make_train_sampler(global_step=0, max_steps=4))
    batches = list(loader)
    assert len(batches) == 4
    batch = batches[0]
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["prompts"] == [dm.hparams.instance_prompt] * 2 + [CLASS_PROMPT] * 2
    assert "seeds" not in batch
    # Resuming at step 2 yields the same batches as the uninterrupted run.
    resumed = list(dm.make_train_dataloader(dm.make_train_sampler(global_step=2, max_steps=4)))
    assert len(resumed) == 2
    assert all(
        torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(resumed, batches[2:], strict=True)
    )


def test_instance_prompt_substitutes_manifest_prompt(tmp_path):
    teacher = teacher_dir(tmp_path, 2)
    append_manifest(teacher, {"file": "000000.png", "prompt": "a gold square"})
    with pytest.raises(ValueError, match=r"000001\.png: --data\.instance_prompt contains \{prompt\}"):
        datamodule(teacher, instance_prompt="{prompt}, like <s1><s2>")
    append_manifest(teacher, {"file": "000001.png", "prompt": "a gold circle"})
    dm = datamodule(teacher, instance_prompt="{prompt}, like <s1><s2>", batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.make_train_dataloader(dm.make_train_sampler(0, 1))))
    assert sorted(batch["prompts"]) == ["a gold circle, like <s1><s2>", "a gold square, like <s1><s2>"]
    assert batch["is_prior"].tolist() == [False, False]


def test_collate_validation_seeds():
    ds = TeacherPriorDataset([(Path("x.png"), "p")], resolution=8)
    ds._images[Path("x.png")] = Image.new("RGB", (8, 8), (255, 0, 0))
    ds._content_ids[Path("x.png")] = "x"  # no file behind it: the cache key's content id, given
    batch = collate([ds[3], ds[4]])
    assert batch["seeds"].tolist() == [3, 4]
    assert batch["pixel_values"][0, 0].eq(1).all() and batch["pixel_values"][0, 1].eq(-1).all()


# ------------------------------------------------------------------------------------- manifest


def test_manifest_truncated_last_line_is_skipped(tmp_path):
    append_manifest(tmp_path, {"file": "000000.png", "prompt": "a"})
    with open(tmp_path / "manifest.jsonl", "a") as fh:
        fh.write('{"file": "000001.png", "pro')  # a crash mid-write
    with pytest.warns(UserWarning, match=r"manifest\.jsonl:2: skipping truncated"):
        assert read_manifest(tmp_path) == [{"file": "000000.png", "prompt": "a"}]
    # The next append replaces the fragment instead of gluing onto it.
    append_manifest(tmp_path, {"file": "000001.png", "prompt": "b"})
    assert [r["prompt"] for r in read_manifest(tmp_path)] == ["a", "b"]


def test_manifest_bad_middle_line_raises_with_line_number(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png"}\nnot json\n{"file": "b.png"}\n')
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: invalid manifest line"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path / "missing") == []


def test_save_png_atomic_returns_sha_of_file(tmp_path):
    sha = save_png_atomic(Image.new("RGB", (4, 4), (1, 2, 3)), tmp_path / "x.png")
    assert sha == hashlib.sha256((tmp_path / "x.png").read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left behind
    assert json.loads(json.dumps({"sha": sha}))["sha"] == sha
