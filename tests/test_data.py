"""Tests of dallm.data.datamodule: the DataModule's teacher/val split, prompts, class images (present, refused, generated), loaders."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dallm.arch.tiny import make_tiny_images
from dallm.data.datamodule import DallmDataModule
from dallm.manifest import append_manifest, lock_directory, read_manifest, sha256_file

CLASS_PROMPT = "a painting of a cat"


def teacher_dir(tmp_path: Path, n: int = 6, name: str = "teacher") -> Path:
    make_tiny_images(tmp_path / name, n)
    return tmp_path / name


def datamodule(teacher: Path, **kwargs) -> DallmDataModule:
    kwargs.setdefault("resolution", 16)
    return DallmDataModule(teacher_dir=str(teacher), **kwargs)


def test_resolution_must_be_multiple_of_8(tmp_path):
    with pytest.raises(ValueError, match=r"--data\.resolution"):
        datamodule(teacher_dir(tmp_path), resolution=30)


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


def test_teacher_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data\.teacher_dir: directory .*nope does not exist"):
        datamodule(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"--data\.teacher_dir: no images in .*empty.*\.png"):
        datamodule(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"--data\.num_teacher_images=9 .* only 6"):
        datamodule(teacher_dir(tmp_path), num_teacher_images=9)


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


def test_prior_generation_is_cached_and_extended(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import dallm.teacher.pipeline as generate

    calls = []
    real = generate.generate_with_pipeline
    monkeypatch.setattr(
        generate, "generate_with_pipeline", lambda *a, **k: calls.append(k["seeds"]) or real(*a, **k)
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


def _fake_prior_dir(tmp_path: Path, n: int) -> Path:
    prior = tmp_path / "prior"
    for p in make_tiny_images(prior, n, seed=7, dark=False):
        record = {"file": p.name, "sha256": sha256_file(p), "prompt": CLASS_PROMPT, "model": ""}
        append_manifest(prior, {**record, "seed": int(p.stem)})
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


def test_prior_images_are_present_as_teacher_images_are(tmp_path):
    """File + sha256 + settings, as `dallm teacher` checks --out: other settings are refused, not warned."""
    teacher = teacher_dir(tmp_path, 3)
    prior = _fake_prior_dir(tmp_path, 2)
    for record in read_manifest(prior):
        append_manifest(prior, {**record, "steps": 25, "guidance_scale": 7.5})  # the last record describes it
    kwargs = dict(class_prompt=CLASS_PROMPT, prior_dir=str(prior), num_prior_images=2)
    datamodule(teacher, **kwargs).prepare_data()  # same settings: present, nothing generated

    with pytest.raises(
        ValueError, match=r"--data\.prior_dir: .*steps 25 .*--data\.prior_generation_steps 10: choose another"
    ):
        datamodule(teacher, **kwargs, prior_generation_steps=10).prepare_data()
    with pytest.raises(ValueError, match=r"guidance_scale 7\.5 .*--data\.prior_guidance_scale 5\.0"):
        datamodule(teacher, **kwargs, prior_guidance_scale=5.0).prepare_data()

    (prior / "000001.png").write_bytes((prior / "000000.png").read_bytes())  # edited after it was written
    with pytest.raises(ValueError, match=r"--data\.prior_dir: .*000001\.png does not match its sha256"):
        datamodule(teacher, **kwargs).prepare_data()


@pytest.mark.slow  # over a second: the full suite runs it, the fast loop stays under a minute
def test_prior_dir_is_locked_and_stale_temp_files_are_removed(tmp_path):
    teacher = teacher_dir(tmp_path, 3)
    prior = _fake_prior_dir(tmp_path, 2)
    stale = prior / ".000002.png.x1y2.tmp"  # what a kill during save_bytes_atomic leaves
    stale.write_bytes(b"half a png")
    dm = datamodule(teacher, class_prompt=CLASS_PROMPT, prior_dir=str(prior), num_prior_images=2)
    # Another holder (a parallel run of a sweep filling the same class images): prepare_data waits for it.
    import threading

    waiting = threading.Thread(target=dm.prepare_data)
    with lock_directory(prior):
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive()  # still waiting for the lock
        assert stale.exists()  # not touched while another process may be writing it
    waiting.join(timeout=120)
    assert not waiting.is_alive() and not stale.exists()  # the lock released: it ran, and tidied
