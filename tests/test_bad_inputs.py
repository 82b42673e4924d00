"""A catalogue of bad inputs: each one exits 2 with one error line naming the flag or file, writing nothing.

Every case runs `dallm.cli.main([...])` in-process and fails before class images, model loading or any
request, so the whole table runs in about a second per case. The id of each case says what is wrong;
`pytest --collect-only -q tests/test_bad_inputs.py` prints the table. The slow part at the end trains for
real: a refused resume leaves the original run byte-identical.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from dallm.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BASE = ROOT / "assets" / "tiny" / "base"
TEACHER = ROOT / "assets" / "tiny" / "teacher"
READ_ONLY = Path("/proc/sys/dallm-test")  # not creatable, even by root: a stand-in for a read-only mount


# ------------------------------------------------------------------------------------------ fixtures


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file and directory under root with (size, mtime, first bytes): what 'nothing changed' means."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        head = p.read_bytes()[:64] if p.is_file() else b""
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns, head)
    return out


# What dallm.contract.ContractRecord writes into a checkpoint of the tiny config (configs/tiny.yaml).
TINY_RECORD = {
    "model.optimizer": "torch.optim.adamw.AdamW",
    "model.lr_scheduler": None,
    "trainer.accumulate_grad_batches": 1,
    "trainer.precision": "32-true",
    "trainer.gradient_clip_val": None,
    "trainer.gradient_clip_algorithm": None,
    "world_size": 1,
    "kid.seed": 0,
    "kid.feature": "module:dallm.tiny:feature_net",  # what checkpoints before the class_path form recorded
    "kid.weights": None,
    "kid.num_inference_steps": 4,
    "kid.guidance_scale": 7.5,
    "kid.scheduler": "dpm++",
    "kid.subset_size": 1000,
    "kid.subsets": 100,
}


def fake_checkpoint(path: Path, schedulers: list | None = None, record: dict | None = None, **changes) -> Path:
    """A checkpoint holding what Lightning stores for the tiny config (hparams, optimizer groups), no weights.

    The resume contract is checked from these fields before anything loads the weights, so this is all a
    refusal needs; the slow test below refuses a real checkpoint too. `record`: also dallm's contract
    record (TINY_RECORD updated by it), as every checkpoint dallm writes now holds.
    """
    model = {
        "pretrained_model_name_or_path": str(BASE),
        "revision": None,
        "variant": None,
        "rank": 4,
        "alpha": None,
        "lora_dropout": 0.0,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        "train_text_encoder": False,
        "text_encoder_target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "placeholder_tokens": ["<s1>", "<s2>"],
        "initializer_token": "painting",
        "token_lr": 0.001,
        "instance_prompt": "a realistic painting of a cat in baroque art style like <s1><s2>",
        "prior_loss_weight": 1.0,
        "snr_gamma": None,
        "noise_offset": 0.0,
        "use_dora": False,
        "seed": 0,
    }
    data = {
        "teacher_dir": str(TEACHER),
        "num_teacher_images": None,
        "num_val_images": 0,
        "instance_prompt": model["instance_prompt"],
        "class_prompt": "a realistic painting of a cat in baroque art style",
        "num_prior_images": 8,
        "resolution": 32,
        "center_crop": True,
        "random_flip": False,
        "batch_size": 4,
        "seed": 0,
    }
    for key, value in changes.items():
        (model if key in model else data)[key] = value
    groups = [{"name": "lora", "lr": 0.001, "weight_decay": 0.01, "eps": 1e-8, "betas": (0.9, 0.999)}]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {},
            "global_step": 2,
            "hyper_parameters": model,
            "datamodule_hyper_parameters": data,
            "optimizer_states": [{"state": {}, "param_groups": groups}],
            "lr_schedulers": schedulers or [],
            # A run with KID rounds (its KID settings are part of the contract only then).
            **({"dallm_contract": {**TINY_RECORD, **record}} if record is not None else {}),
            "callbacks": {"KIDCallback": {"history": [{"step": 0, "kid/val": 0.05}]}},
        },
        path,
    )
    return path


def resume(record: dict | None, *flags: str, match: str, **changes) -> Case:
    """A resume of a fake tiny checkpoint (with a contract record unless None) under other `flags`."""
    return fit_with(
        lambda tmp: ["--ckpt_path", str(fake_checkpoint(tmp / "c.ckpt", record=record, **changes)), *flags], match
    )


def png(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def fit_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(TINY),
        "--model.pretrained_model_name_or_path",
        str(BASE),
        "--data.teacher_dir",
        str(TEACHER),
        "--data.prior_dir",
        str(tmp / "prior"),
        "--trainer.logger.init_args.save_dir",
        str(tmp / "logs"),
        *extra,
    ]


# Each case: id -> (make args from tmp_path (may create input files first), text the error line must hold).
Case = tuple[Callable[[Path], list[str]], str]


def fit(*extra: str, match: str) -> Case:
    return (lambda tmp: fit_args(tmp, *extra), match)


def fit_with(setup: Callable[[Path], list[str]], match: str) -> Case:
    return (lambda tmp: fit_args(tmp, *setup(tmp)), match)


def yaml_file(text: str, name: str = "bad.yaml") -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / name).write_text(text)
        return ["--config", str(tmp / name)]

    return make


def write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def kid(setup: Callable[[Path], list[str]], match: str) -> Case:
    return (lambda tmp: ["kid", *setup(tmp)], match)


def teacher(setup: Callable[[Path], list[str]], match: str) -> Case:
    return (lambda tmp: ["teacher", *setup(tmp), "--progress", "false"], match)


def two_dirs(tmp: Path, real: int = 3, fake: int = 3, big: bool = False, corrupt: bool = False) -> list[str]:
    for i in range(real):
        png(tmp / "real" / f"{i}.png")
    for i in range(fake):
        png(tmp / "fake" / f"{i}.png")
    if big:  # 1-bit mode: a 12000x12000 PNG of a few MB whose decode would be 432 MB of RGB; KID prepares
        # a 6000x6000 file in bounded memory (test_features), this one is over dallm.images.MAX_IMAGE_PIXELS
        png(tmp / "fake" / "huge.png", (12000, 12000), "1")
    if corrupt:
        (tmp / "fake" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return [str(tmp / "real"), str(tmp / "fake")]


def with_env(case: Case, **env: str) -> tuple:
    """A case run with these environment variables (the test sets them)."""
    return (*case, env)


def openai(*extra: str, match: str, prompt: str = "a cat", model: str = "dall-e-2") -> Case:
    return teacher(
        lambda tmp: ["--backend", "openai", "--model", model, "--prompt", prompt, "--n", "1",
                     "--out", str(tmp / "out"), *extra],
        match,
    )  # fmt: skip


def toy_fit(*extra: str, match: str) -> Case:
    toy = ROOT / "dallm" / "toy" / "assets"
    return (
        lambda tmp: ["fit", "--config", str(ROOT / "configs" / "toy.yaml"),
                     "--model.pretrained_model_name_or_path", str(toy / "base"), "--data.teacher_dir",
                     str(toy / "teacher"), "--data.prior_dir", str(tmp / "prior"),
                     "--trainer.logger.init_args.save_dir", str(tmp / "logs"), *extra],
        match,
    )  # fmt: skip


def teacher_with_prompts(tmp: Path, prompt: str) -> list[str]:
    """The tiny teacher images in a dir of their own, each with `prompt` in its manifest line."""
    out = tmp / "teacher"
    out.mkdir()
    for p in sorted(TEACHER.glob("*.png")):
        (out / p.name).write_bytes(p.read_bytes())
        with open(out / "manifest.jsonl", "a") as fh:
            fh.write(json.dumps({"file": p.name, "prompt": prompt}) + "\n")
    return ["--data.teacher_dir", str(out), "--data.instance_prompt", "{prompt} like <s1><s2>"]


def sweep(*extra: str, match: str) -> Case:
    return (
        lambda tmp: ["sweep", "--config", str(TINY), "--save_dir", str(tmp / "sweeps"), "--dry_run", "true",
                     *extra],
        match,
    )  # fmt: skip


def export_truncated(tmp: Path) -> list[str]:
    """A run dir whose only checkpoint is a last.ckpt cut short (a copy interrupted, a disk that filled)."""
    ckpts = tmp / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(fake_checkpoint(tmp / "full.ckpt").read_bytes()[:300])
    (tmp / "full.ckpt").unlink()
    return ["export", str(tmp / "run")]


LONG = " ".join(["a very detailed painting"] * 20)  # 81 tokens with <s1><s2>: over CLIP's 77


def folder_src(tmp: Path) -> list[str]:
    for i in range(2):
        png(tmp / "src" / f"{i}.png")
    return ["--backend", "folder", "--src", str(tmp / "src"), "--out", str(tmp / "out")]


CASES: dict[str, Case] = {
    # --- command line: parser errors are one line + "see --help"
    "fit-typo-flag": fit("--model.rnak", "3", match="--model.rnak"),
    "fit-wrong-type-int": fit("--model.rank", "abc", match="model.rank"),
    "fit-wrong-type-bool": fit("--model.train_text_encoder", "maybe", match="model.train_text_encoder"),
    "fit-wrong-type-list": fit("--model.placeholder_tokens", "{a: 1}", match="model.placeholder_tokens"),
    "fit-unknown-optimizer-class": fit("--model.optimizer", "torch.optim.NoSuchOpt", match="optimizer"),
    "unknown-subcommand": ((lambda tmp: ["fitt", "--config", str(TINY)]), "fitt"),
    # --- trainer
    "trainer-max_steps-negative": fit("--trainer.max_steps", "-5", match="--trainer.max_steps"),
    "trainer-max_steps-zero": fit("--trainer.max_steps", "0", match="--trainer.max_steps"),
    "trainer-max_steps-unlimited": fit("--trainer.max_steps", "-1", match="--trainer.max_steps"),
    "trainer-weights_only-false": fit("--weights_only", "false", match="--weights_only"),
    "trainer-log-dir-is-a-file": fit_with(
        lambda tmp: ["--trainer.logger.init_args.save_dir", str(write(tmp, "f", b"x"))],
        "--trainer.logger.init_args.save_dir",
    ),
    "trainer-log-dir-read-only": fit(
        "--trainer.logger.init_args.save_dir", str(READ_ONLY), match="--trainer.logger.init_args.save_dir"
    ),
    # --- model
    "model-rank-zero": fit("--model.rank", "0", match="--model.rank"),
    # Checked on the architecture built from the config files (meta device), before the class images.
    "model-target_modules-no-match": fit(
        "--model.target_modules", "[to_x]", match="--model.target_modules: 'to_x' matches no module"
    ),
    "model-text_encoder_target_modules-no-match": fit(
        "--model.train_text_encoder", "true", "--model.text_encoder_target_modules", "[q_projx]",
        match="--model.text_encoder_target_modules: 'q_projx' matches no module",
    ),
    "model-alpha-negative": fit("--model.alpha", "-1", match="--model.alpha"),
    "model-lora_dropout-one": fit("--model.lora_dropout", "1.0", match="--model.lora_dropout"),
    "model-prior_loss_weight-negative": fit(
        "--model.prior_loss_weight", "-1", match="--model.prior_loss_weight"
    ),
    "model-uncond_loss_weight-negative": fit(
        "--model.uncond_loss_weight", "-1", match="--model.uncond_loss_weight"
    ),
    "model-hold_weight-negative": fit("--model.hold_weight", "-1", match="--model.hold_weight"),
    "model-hold_weight-without-prompt": fit(
        "--model.hold_weight", "1", "--data.class_prompt", "null", match="--model.hold_weight needs a prompt"
    ),
    "model-hold_prompts-placeholder": fit("--model.hold_prompts", "[a <s1> cat]", match="--model.hold_prompts"),
    "model-hold_latents-unknown": fit("--model.hold_latents", "teacher", match="--model.hold_latents"),
    "model-uncond_latents-unknown": fit("--model.uncond_latents", "teacher", match="--model.uncond_latents"),
    "model-instance_guidance_scale-below-one": fit(
        "--model.instance_guidance_scale", "0.5", match="--model.instance_guidance_scale"
    ),
    "model-instance_guidance_anchor-unknown": fit(
        "--model.instance_guidance_anchor", "teacher", match="--model.instance_guidance_anchor"
    ),
    "model-ema_decay-one": fit("--model.ema_decay", "1", match="--model.ema_decay"),
    "model-snr_gamma-zero": fit("--model.snr_gamma", "0", match="--model.snr_gamma"),
    "model-token_lr-zero": fit("--model.token_lr", "0", match="--model.token_lr"),
    "model-lr-negative": fit("--model.optimizer.lr", "-1", match="--model.optimizer.lr"),
    "model-weight_decay-negative": fit(
        "--model.optimizer.weight_decay", "-1", match="--model.optimizer.weight_decay"
    ),
    "model-initializer-several-tokens": fit(
        "--model.initializer_token", "a cat painting", match="--model.initializer_token"
    ),
    "model-placeholder-real-word": fit(
        "--model.placeholder_tokens",
        "[circle]",
        "--data.instance_prompt",
        "a circle",
        match="--model.placeholder_tokens: 'circle'",
    ),
    "model-placeholder-vocab-entry": fit(
        "--model.placeholder_tokens",
        "[cat</w>]",
        "--data.instance_prompt",
        "a cat</w>",
        match="--model.placeholder_tokens",
    ),
    "model-placeholder-duplicates": fit(
        "--model.placeholder_tokens", "[<s1>, <s1>]", match="--model.placeholder_tokens"
    ),
    "model-placeholder-with-space": fit(
        "--model.placeholder_tokens",
        "['<s 1>']",
        "--data.instance_prompt",
        "a <s 1>",
        match="--model.placeholder_tokens",
    ),
    "model-placeholder-not-in-prompt": fit("--model.placeholder_tokens", "[<s3>]", match="<s3>"),
    "model-base-missing": fit(
        "--model.pretrained_model_name_or_path",
        "/nonexistent/base",
        match="--model.pretrained_model_name_or_path",
    ),
    "model-base-is-empty-dir": fit_with(
        lambda tmp: ["--model.pretrained_model_name_or_path", str((tmp / "empty").mkdir() or tmp / "empty")],
        "--model.pretrained_model_name_or_path",
    ),
    # --- data
    "data-resolution-not-multiple-of-8": fit("--data.resolution", "30", match="--data.resolution"),
    "data-batch_size-zero": fit("--data.batch_size", "0", match="--data.batch_size"),
    "data-num_workers-negative": fit("--data.num_workers", "-1", match="--data.num_workers"),
    "data-num_val_images-negative": fit("--data.num_val_images", "-1", match="--data.num_val_images"),
    "data-num_teacher_images-too-many": fit(
        "--data.num_teacher_images", "99", match="--data.num_teacher_images"
    ),
    "data-num_prior_images-zero": fit("--data.num_prior_images", "0", match="--data.num_prior_images"),
    "data-prior_generation_steps-zero": fit(
        "--data.prior_generation_steps", "0", match="--data.prior_generation_steps"
    ),
    "data-prior_batch_size-zero": fit("--data.prior_batch_size", "0", match="--data.prior_batch_size"),
    "data-instance_prompt-without-tokens": fit(
        "--data.instance_prompt", "a cat", match="--data.instance_prompt"
    ),
    "data-teacher_dir-missing": fit("--data.teacher_dir", "/nonexistent/teacher", match="--data.teacher_dir"),
    "data-teacher_dir-is-a-file": fit_with(
        lambda tmp: ["--data.teacher_dir", str(write(tmp, "t", b"x"))], "--data.teacher_dir"
    ),
    "data-teacher_dir-empty": fit_with(
        lambda tmp: ["--data.teacher_dir", str((tmp / "none").mkdir() or tmp / "none")], "--data.teacher_dir"
    ),
    "data-prior_dir-is-a-file": fit_with(
        lambda tmp: ["--data.prior_dir", str(write(tmp, "p", b"x"))], "--data.prior_dir"
    ),
    "data-prior_dir-read-only": fit("--data.prior_dir", str(READ_ONLY), match="--data.prior_dir"),
    "data-class_prompt-without-prior_dir": fit("--data.prior_dir", "null", match="--data.prior_dir"),
    # --- KID callback: refused at construction, not at the first KID round
    "kid-subset_size-one": fit("--kid.subset_size", "1", match="--kid.subset_size"),
    "kid-subsets-zero": fit("--kid.subsets", "0", match="--kid.subsets"),
    "kid-every_n_steps-negative": fit("--kid.every_n_steps", "-1", match="--kid.every_n_steps"),
    "kid-num_samples-one": fit("--kid.num_samples", "1", match="--kid.num_samples"),
    "kid-scheduler-unknown": fit("--kid.scheduler", "euler", match="--kid.scheduler"),
    "kid-batch_size-zero": fit("--kid.batch_size", "0", match="--kid.batch_size"),
    # --- checkpoints and the resume contract (refused before anything is written)
    "ckpt-random-file": fit_with(
        lambda tmp: ["--ckpt_path", str(write(tmp, "x.ckpt", os.urandom(4096)))], "--ckpt_path"
    ),
    "ckpt-pickle-with-code": fit_with(
        lambda tmp: ["--ckpt_path", str(write(tmp, "x.ckpt", b"cos\nsystem\n(S'true'\ntR."))], "--ckpt_path"
    ),
    "ckpt-empty-file": fit_with(lambda tmp: ["--ckpt_path", str(write(tmp, "x.ckpt", b""))], "--ckpt_path"),
    "ckpt-truncated": fit_with(
        lambda tmp: [
            "--ckpt_path",
            str(write(tmp, "t.ckpt", fake_checkpoint(tmp / "full.ckpt").read_bytes()[:300])),
        ],
        "--ckpt_path",
    ),
    "ckpt-missing-file": fit("--ckpt_path", "/nonexistent/last.ckpt", match="--ckpt_path"),
    "ckpt-last-nothing-to-resume": fit("--ckpt_path", "last", match="--ckpt_path last"),
    "resume-rank-differs": fit_with(
        lambda tmp: ["--ckpt_path", str(fake_checkpoint(tmp / "c.ckpt")), "--model.rank", "8"],
        "--model.rank 4 vs 8",
    ),
    "resume-base-differs": fit_with(
        lambda tmp: ["--ckpt_path", str(fake_checkpoint(tmp / "c.ckpt", pretrained_model_name_or_path="x"))],
        "--model.pretrained_model_name_or_path 'x' vs",
    ),
    "resume-alpha-differs": fit_with(
        lambda tmp: ["--ckpt_path", str(fake_checkpoint(tmp / "c.ckpt")), "--model.alpha", "8"],
        "--model.alpha None vs 8.0",
    ),
    "resume-targets-differ": fit_with(
        lambda tmp: ["--ckpt_path", str(fake_checkpoint(tmp / "c.ckpt")), "--model.target_modules", "[to_q]"],
        "--model.target_modules",
    ),
    "resume-tokens-differ": fit_with(
        lambda tmp: [
            "--ckpt_path",
            str(fake_checkpoint(tmp / "c.ckpt", placeholder_tokens=["<s1>"])),
        ],
        "--model.placeholder_tokens ['<s1>'] vs ['<s1>', '<s2>']",
    ),
    "resume-text-encoder-lora-differs": fit_with(
        lambda tmp: [
            "--ckpt_path",
            str(fake_checkpoint(tmp / "c.ckpt")),
            "--model.train_text_encoder",
            "true",
        ],
        "--model.train_text_encoder False vs True",
    ),
    "resume-resolution-differs": fit_with(
        lambda tmp: ["--ckpt_path", str(fake_checkpoint(tmp / "c.ckpt")), "--data.resolution", "64"],
        "--data.resolution 32 vs 64",
    ),
    "resume-prompt-differs": fit_with(
        lambda tmp: [
            "--ckpt_path",
            str(fake_checkpoint(tmp / "c.ckpt")),
            "--data.class_prompt",
            "a dog",
        ],
        "--data.class_prompt",
    ),
    "resume-seed-differs": fit_with(
        lambda tmp: ["--ckpt_path", str(fake_checkpoint(tmp / "c.ckpt")), "--data.seed", "3"],
        "--data.seed 0 vs 3",
    ),
    "resume-lr-differs": fit_with(
        lambda tmp: ["--ckpt_path", str(fake_checkpoint(tmp / "c.ckpt")), "--model.optimizer.lr", "0.5"],
        "--model.optimizer.lr 0.001 vs 0.5",
    ),
    "resume-schedule-length-differs": fit_with(
        lambda tmp: [
            "--ckpt_path",
            str(fake_checkpoint(tmp / "c.ckpt", schedulers=[{"total_iters": 2, "start_factor": 0.25}])),
            "--model.lr_scheduler",
            "torch.optim.lr_scheduler.LinearLR",
            "--model.lr_scheduler.total_iters",
            "10",
        ],
        "--model.lr_scheduler.total_iters 2 vs 10",
    ),
    "resume-several-differ-listed": fit_with(
        lambda tmp: [
            "--ckpt_path",
            str(fake_checkpoint(tmp / "c.ckpt")),
            "--model.rank",
            "2",
            "--data.batch_size",
            "1",
        ],
        "--model.rank 4 vs 2; --data.batch_size 4 vs 1",
    ),
    # --- YAML config files
    "yaml-unknown-key": fit_with(yaml_file("model:\n  rnak: 3\n"), "rnak"),
    "yaml-malformed-names-file": fit_with(yaml_file("model: [rank: 3\n"), "bad.yaml"),
    "yaml-wrong-type": fit_with(yaml_file("model:\n  rank: four\n"), "model.rank"),
    "yaml-top-level-list": fit_with(yaml_file("- 1\n- 2\n"), "bad.yaml"),
    "yaml-missing-file": fit("--config", "/nonexistent/c.yaml", match="/nonexistent/c.yaml"),
    # --- dallm kid (its parser is being rewritten: behaviour, not wording)
    "kid-real-dir-missing": kid(lambda tmp: ["/nonexistent/real", two_dirs(tmp)[1]], "/nonexistent/real"),
    "kid-fake-dir-is-a-file": kid(lambda tmp: [two_dirs(tmp)[0], str(write(tmp, "f", b"x"))], str(Path("f"))),
    "kid-too-few-images": kid(lambda tmp: two_dirs(tmp, fake=1), "fake"),
    "kid-subset_size-one-cli": kid(lambda tmp: [*two_dirs(tmp), "--subset_size", "1"], "subset_size"),
    "kid-corrupt-image": kid(lambda tmp: [*two_dirs(tmp, corrupt=True), "--feature", "toy"], "broken.png"),
    "kid-12000x12000-image-over-decode-limit": kid(lambda tmp: [*two_dirs(tmp, big=True), "--feature", "toy"], "huge.png"),
    "kid-unknown-feature": kid(lambda tmp: [*two_dirs(tmp), "--feature", "nonsense"], "nonsense"),
    # --- dallm export
    "export-name-not-a-trigger-word": (lambda tmp: ["export", str(tmp), "--name", "baroque"], "--name"),
    "export-source-neither-checkpoint-nor-export": (lambda tmp: ["export", str(tmp)], "SOURCE"),
    "export-format-unknown": (lambda tmp: ["export", str(tmp), "--format", "webui"], "--format"),
    # --- dallm teacher (its parser is being rewritten: behaviour, not wording)
    "teacher-folder-without-src": teacher(
        lambda tmp: ["--backend", "folder", "--out", str(tmp / "out")], "--src"
    ),
    "teacher-src-missing": teacher(
        lambda tmp: ["--backend", "folder", "--src", "/nonexistent/src", "--out", str(tmp / "out")],
        "/nonexistent/src",
    ),
    "teacher-n-zero": teacher(lambda tmp: [*folder_src(tmp), "--n", "0"], "--n"),
    "teacher-out-is-a-file": teacher(
        lambda tmp: [*folder_src(tmp)[:4], "--out", str(write(tmp, "o", b"x"))], "--out"
    ),
    "teacher-openai-size-not-offered": teacher(
        lambda tmp: [
            "--backend",
            "openai",
            "--model",
            "dall-e-2",
            "--prompt",
            "a cat",
            "--n",
            "1",
            "--size",
            "1792x1024",
            "--out",
            str(tmp / "out"),
        ],
        "--size",
    ),
}


# Issue 25: each case failed on the code before it (a traceback, a late refusal, or no refusal at all).
CASES.update(
    {
        # 1. A prompt longer than the text encoder reads: its tail, the placeholders too, was cut silently.
        "prompt-toy-over-16-tokens": toy_fit(
            "--data.instance_prompt", "a painting of a large red circle on a dark canvas <s1><s2>",
            match="is 28 tokens, more than the 16",
        ),
        "prompt-instance-over-77-tokens": fit(
            "--data.instance_prompt", LONG + " <s1><s2>", match="--data.instance_prompt: the prompt"
        ),
        "prompt-manifest-prompt-over-77-tokens": fit_with(
            lambda tmp: teacher_with_prompts(tmp, LONG), "with the {prompt} of"
        ),
        "prompt-class-over-77-tokens": fit("--data.class_prompt", LONG, match="--data.class_prompt: the prompt"),
        # 5-7. The resume contract: every setting that changes what trains, refused naming both values.
        # The same lr as the checkpoint's: only the class differs.
        "resume-optimizer-class-differs": resume(
            {}, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.001",
            match="--model.optimizer 'torch.optim.adamw.AdamW' vs 'torch.optim.sgd.SGD'",
        ),
        "resume-optimizer-state-of-another-class": resume(
            None, "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.001",
            match="--model.optimizer: the checkpoint's optimizer state has settings ['betas', 'eps']",
        ),
        "resume-use_dora-differs": resume({}, "--model.use_dora", "true", match="--model.use_dora False vs True"),
        "resume-noise_offset-differs": resume(
            {}, "--model.noise_offset", "0.1", match="--model.noise_offset 0.0 vs 0.1"
        ),
        "resume-accumulate_grad_batches-differs": resume(
            {}, "--trainer.accumulate_grad_batches", "2", match="--trainer.accumulate_grad_batches 1 vs 2"
        ),
        "resume-precision-differs": resume(
            {}, "--trainer.precision", "bf16-mixed", match="--trainer.precision '32-true' vs 'bf16-mixed'"
        ),
        "resume-gradient_clip-differs": resume(
            {}, "--trainer.gradient_clip_val", "1.0", match="--trainer.gradient_clip_val None vs 1.0"
        ),
        # A run made on 2 processes, resumed on 1 (not the other way round here: that would start DDP).
        "resume-world-size-differs": resume({"world_size": 2}, match="(world size) 2 vs 1"),
        "resume-kid-seed-differs": resume({}, "--kid.seed", "3", match="--kid.seed 0 vs 3"),
        "resume-kid-feature-differs": resume(
            {}, "--kid.feature", "toy",
            match="--kid.feature {'class_path': 'dallm.arch.tiny.TinyFeatureNet', 'init_args': {}} vs 'toy'"
        ),
        "resume-scheduler-class-differs": resume(
            {"model.lr_scheduler": "torch.optim.lr_scheduler.LinearLR"},
            "--model.lr_scheduler", "torch.optim.lr_scheduler.ConstantLR",
            match="--model.lr_scheduler 'torch.optim.lr_scheduler.LinearLR' vs 'torch.optim.lr_scheduler.ConstantLR'",
        ),
        "resume-cosine-length-follows-max_steps": fit_with(
            lambda tmp: [
                "--ckpt_path",
                str(fake_checkpoint(tmp / "c.ckpt", schedulers=[{"T_max": 2, "eta_min": 0.0}])),
                "--model.lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR",
                "--model.lr_scheduler.T_max", "2", "--trainer.max_steps", "4",
            ],
            "--model.lr_scheduler.T_max 2 vs 4 (it follows --trainer.max_steps)",
        ),
        # 10-11. Money: refused before any request.
        "teacher-openai-key-trailing-newline": with_env(
            openai(match="OPENAI_API_KEY holds whitespace"), OPENAI_API_KEY="sk-test-not-used\n"
        ),
        "teacher-openai-key-trailing-space": with_env(
            openai(match="OPENAI_API_KEY holds whitespace"), OPENAI_API_KEY="sk-test-not-used "
        ),
        "teacher-openai-prompt-over-dall-e-2-limit": openai(
            prompt="x" * 10_000, match="--prompt is 10000 characters; dall-e-2 takes at most 1000"
        ),
        "teacher-openai-prompt-over-dall-e-3-limit": openai(
            prompt="x" * 4001, model="dall-e-3", match="--prompt is 4001 characters; dall-e-3 takes at most 4000"
        ),
        # 12-14. Tracebacks and late refusals.
        "model-rank-larger-than-every-layer": fit(
            "--model.rank", "1000000000", match="--model.rank 1000000000 is larger than any layer"
        ),
        "model-rank-33-on-32-wide-layers": fit("--model.rank", "33", match="here at most 32"),
        "export-only-checkpoint-truncated": (export_truncated, "last.ckpt is unreadable"),
        "kid-feature-unknown-refused-before-class-images": fit(
            "--kid.feature", "nosuch", match="--kid.feature 'nosuch'"
        ),
        "kid-feature-module-missing": fit(
            "--kid.feature", '{"class_path": "no_such_module.Net"}', match="--feature no_such_module.Net: cannot import"
        ),
        "data-teacher-image-over-pixel-limit-before-class-images": fit_with(
            lambda tmp: [
                "--data.teacher_dir",
                str(png(tmp / "t" / "huge.png", (8000, 8000), "1").parent),
                "--data.instance_prompt", "a <s1><s2>",
            ],
            "huge.png: image is 8000x8000 (64 megapixels)",
        ),
        # 15. Messages that named no flag or file.
        "seed_everything-negative": fit("--seed_everything", "-1", match="--seed_everything must be in [0, 4294967295]"),
        "seed_everything-over-numpy-range": fit(
            "--seed_everything", "4294967296", match="--seed_everything must be in [0, 4294967295]"
        ),
        "yaml-empty-file": fit_with(yaml_file(""), "bad.yaml: the file is empty"),
        "optimizer-lr-nan": fit("--model.optimizer.init_args.lr", "nan", match="--model.optimizer.lr: expected float, got nan"),
        "optimizer-lr-inf": fit("--model.optimizer.lr", "inf", match="--model.optimizer.lr: expected float, got inf"),
        # 16. A sweep whose runs would all fail.
        "sweep-grid-key-typo": sweep("--grid", "model.rnak=1,2", match="--model.rnak"),
        "sweep-extra-flag-typo": sweep("--", "--model.rnak", "2", match="--model.rnak"),
        "sweep-slurm-time-zero": sweep("--slurm.time", "0", match="--slurm.time must be >= 1, got 0"),
        "sweep-seed-negative": sweep("--seeds", "[-1]", match="--seeds"),
        # 17. Counts that accepted 0 (or a fraction) and ran something else than asked, exit 0.
        "kid-num_inference_steps-zero": fit("--kid.num_inference_steps", "0", match="--kid.num_inference_steps must be >= 1"),
        "kid-guidance_scale-negative": fit("--kid.guidance_scale", "-1", match="--kid.guidance_scale must be finite and >= 0"),
        "trainer-max_epochs-zero": fit("--trainer.max_epochs", "0", match="--trainer.max_epochs must be >= 1 or null"),
        "trainer-limit_train_batches-fraction": fit(
            "--trainer.limit_train_batches", "0.5", match="--trainer.limit_train_batches must be 1 or null, got 0.5"
        ),
        "trainer-accumulate_grad_batches-zero": fit(
            "--trainer.accumulate_grad_batches", "0", match="--trainer.accumulate_grad_batches must be >= 1"
        ),
        "trainer-val_check_interval-zero": fit("--trainer.val_check_interval", "0", match="--trainer.val_check_interval"),
        "trainer-gradient_clip_val-negative": fit(
            "--trainer.gradient_clip_val", "-1", match="--trainer.gradient_clip_val must be finite and >= 0 or null"
        ),
        "trainer-log_every_n_steps-zero": fit(
            "--trainer.log_every_n_steps", "0", match="--trainer.log_every_n_steps must be >= 1 or null"
        ),
        "checkpoint-every_n_train_steps-negative": fit(
            "--checkpoint.every_n_train_steps", "-1", match="--checkpoint.every_n_train_steps must be >= 0"
        ),
        "data-resolution-over-pixel-limit": fit("--data.resolution", "1000000000", match="--data.resolution must be in [8, 6320]"),
        "data-prior_guidance_scale-negative": fit(
            "--data.prior_guidance_scale", "-1", match="--data.prior_guidance_scale must be finite and >= 0"
        ),
        "teacher-seed-negative": openai("--seed", "-1", match="--seed must be in [0, 4294967295]"),
        "teacher-timeout-zero": openai("--timeout", "0", match="--timeout must be finite and > 0, got 0"),
        "trainer-num_sanity_val_steps-negative": fit(
            "--trainer.num_sanity_val_steps", "-5", match="--trainer.num_sanity_val_steps must be >= 0 or -1 or null"
        ),
        "kid-cli-seed-negative": kid(lambda tmp: [*two_dirs(tmp), "--seed", "-1"], "--seed must be in [0, 4294967295]"),
        "sample-steps-zero": (lambda tmp: ["sample", "--lora", str(tmp), "--steps", "0"], "--steps must be >= 1, got 0"),
        # 18. Minor: a duplicate YAML key, and one pixel limit for `dallm kid` and `fit`.
        "yaml-duplicate-key": fit_with(
            yaml_file("model:\n  rank: 4\n  rank: 8\n"), "key 'rank' appears twice in one mapping (lines 2 and 3)"
        ),
        "kid-50-megapixel-image-over-the-shared-limit": kid(
            lambda tmp: [*two_dirs(tmp, fake=2), "--feature", "toy"] if png(tmp / "fake" / "big.png", (7100, 7100), "1")
            else [],
            "big.png: image is 7100x7100 (50 megapixels)",
        ),
    }
)


# The full suite runs every case; `pytest -m "not slow"` (under a minute) leaves out three families it
# samples: a flag out of its range (0, -1, nan, inf: refused by its type at parse time, and the slow sweep
# below tries every numeric flag so) and all but three of the resume-contract refusals (one check, many flags).
RANGE_CASE = re.compile(r"^(model|trainer|kid|data|optimizer|checkpoint|seed_everything)-[a-z_]*-?"
                        r"(zero|negative|one|nan|inf|unlimited|over-numpy-range)$")  # fmt: skip
FAST_RESUME = ("resume-lr-differs", "resume-several-differ-listed", "resume-kid-feature-differs")
# ... and, of the fit cases refused at construction (each a full LightningCLI parse), one in three.
SLOW_FAMILIES = ("model-", "data-")


def sampled_out(case: str) -> bool:
    if RANGE_CASE.match(case) or (case.startswith("resume-") and case not in FAST_RESUME):
        return True
    family = [c for c in CASES if c.startswith(SLOW_FAMILIES) and not RANGE_CASE.match(c) and c[:5] == case[:5]]
    return case in family and family.index(case) % 3 != 0


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if sampled_out(c) else []) for c in CASES], ids=list(CASES)
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DALLM_TRACEBACK", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens: no request may go out
    make_args, match, *env = CASES[case]
    for name, value in (env[0] if env else {}).items():
        monkeypatch.setenv(name, value)
    args = make_args(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    if args[0] == "fit" or args[0] == "fitt":
        # dallm's own boundary: exactly one line, the last one (no usage dump before it).
        assert lines[0].startswith("dallm: error: ") and err.strip().splitlines()[-1] == lines[0]
    assert snapshot(tmp_path) == before


def test_catalogue_is_large_enough():
    assert len(CASES) >= 120


def test_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("DALLM_TRACEBACK", "1")
    with pytest.raises(ValueError, match="--data.resolution"):
        main(fit_args(tmp_path, "--data.resolution", "30"))


def test_malformed_yaml_names_the_file_not_a_string(tmp_path, capsys):
    make, _ = CASES["yaml-malformed-names-file"]
    with pytest.raises(SystemExit):
        main(fit_args(tmp_path, *make(tmp_path)))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        str(tmp_path / "bad.yaml") in line and "<unicode string>" not in line and "line 2, column 1" in line
    )


# ------------------------------------------------------------------- wrong-size images from the API


@pytest.mark.slow  # over a second: the full suite runs it, the fast loop stays under a minute
def test_openai_image_of_another_size_is_refused_and_not_kept(tmp_path, capsys, monkeypatch):
    from pytest_httpserver import HTTPServer
    from werkzeug import Response

    from dallm.manifest import read_manifest

    def answer(request):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format="PNG")  # 32x32 for a 512x512 request
        data = [{"b64_json": base64.b64encode(buf.getvalue()).decode()}] * request.get_json()["n"]
        body = json.dumps({"created": 1_700_000_000, "data": data})
        return Response(body, headers={"x-request-id": "req_small"}, content_type="application/json")

    server = HTTPServer(host="127.0.0.1", port=0)
    server.expect_request("/v1/images/generations", method="POST").respond_with_handler(answer)
    server.start()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-printed")
        args = ["--backend", "openai", "--model", "dall-e-2", "--prompt", "a cat", "--n", "2"]
        code = main_code(
            [
                "teacher",
                *args,
                "--size",
                "512x512",
                "--out",
                str(tmp_path / "out"),
                "--base_url",
                server.url_for("/v1"),
                "--progress",
                "false",
            ]
        )
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert code == 1  # the run ends with images missing: re-running asks again
    assert (
        "request req_small: image 0 of the response is malformed: it is 32x32, not the requested 512x512"
        in err
    )
    assert not list((tmp_path / "out").glob("*.png"))
    assert not [r for r in read_manifest(tmp_path / "out") if r.get("file")]


def main_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


# ----------------------------------------------------------------------- files respect the umask


def test_written_files_respect_the_umask(tmp_path):
    from dallm.manifest import save_bytes_atomic
    from dallm.resume import AtomicCheckpointIO

    old = os.umask(0o022)
    try:
        save_bytes_atomic(b"x", tmp_path / "a.png")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "c" / "last.ckpt")
        os.umask(0o077)
        save_bytes_atomic(b"x", tmp_path / "b.png")
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c" / "last.ckpt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.rglob("*.tmp")]


# ------------------------------------------------------------------- a real run, a refused resume


def tiny_fit(tmp: Path, *extra: str) -> None:
    main(
        fit_args(
            tmp,
            "--data.num_prior_images",
            "4",
            "--data.batch_size",
            "2",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--checkpoint.every_n_train_steps",
            "2",
            "--kid.every_n_steps",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        )
    )


@pytest.mark.slow
def test_refused_resume_of_a_real_run_changes_nothing(tmp_path, capsys):
    # KID rounds on: how KID samples (--kid.seed) is in the contract only while a curve goes on.
    tiny_fit(tmp_path, "--kid.every_n_steps", "2")
    run = tmp_path / "logs" / "tiny" / "version_0"
    before = snapshot(tmp_path)
    config = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        tiny_fit(tmp_path, "--model.rank", "8", "--data.resolution", "64", "--ckpt_path", "last")
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--model.rank 4 vs 8" in line and "--data.resolution 32 vs 64" in line
    assert (run / "config.yaml").read_bytes() == config
    assert snapshot(tmp_path) == before
    # The same with an explicit step checkpoint.
    with pytest.raises(SystemExit):
        tiny_fit(tmp_path, "--model.rank", "8", "--ckpt_path", str(run / "checkpoints" / "step=000002.ckpt"))
    assert snapshot(tmp_path) == before
    # Settings the contract missed before (issue 25, items 5-7): refused in one line naming flag and both
    # values, before config.yaml is rewritten or an events file added.
    for flags, named in [
        (["--model.use_dora", "true"], "--model.use_dora False vs True"),
        (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.1"],
         "--model.optimizer 'torch.optim.adamw.AdamW' vs 'torch.optim.sgd.SGD'"),
        (["--model.noise_offset", "0.1"], "--model.noise_offset 0.0 vs 0.1"),
        (["--trainer.accumulate_grad_batches", "2"], "--trainer.accumulate_grad_batches 1 vs 2"),
        (["--trainer.precision", "bf16-mixed"], "--trainer.precision '32-true' vs 'bf16-mixed'"),
        (["--kid.seed", "3"], "--kid.seed 0 vs 3"),
    ]:  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            tiny_fit(tmp_path, "--kid.every_n_steps", "2", *flags, "--ckpt_path", "last")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
        assert named in err.strip().splitlines()[-1], err[-2000:]
        assert snapshot(tmp_path) == before, flags


@pytest.mark.slow
def test_resume_honours_max_steps_and_falls_back_from_an_unreadable_last(tmp_path, capsys):
    tiny_fit(tmp_path)
    ckpts = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints"
    (ckpts / "last.ckpt").write_bytes(b"")  # a write killed before torch.save reached the file
    (ckpts / ".last.ckpt.abcd.tmp").write_bytes(b"half")  # what a killed atomic write leaves
    capsys.readouterr()
    tiny_fit(tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "4")
    out = capsys.readouterr().out
    assert "last.ckpt is unreadable (0 bytes); falling back to" in out and "step=000002.ckpt" in out
    assert "--trainer.max_steps 2 -> 4 (honoured" in out
    assert not (ckpts / ".last.ckpt.abcd.tmp").exists()
    assert (ckpts / "last.ckpt.unreadable").read_bytes() == b""  # set aside, so Lightning writes last.ckpt
    assert not list(ckpts.glob("last-v*.ckpt"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
    assert "max_steps: 4" in (ckpts.parent / "config.yaml").read_text()


@pytest.mark.slow
def test_read_only_file_system_is_one_line_before_any_work(tmp_path):
    """A real read-only mount (tmpfs, ro) in a user namespace: the log dir is refused, nothing is made."""
    import shutil
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to mount a read-only file system for this test")
    # The log dir (the prior dir's read-only case runs in-process above, on /proc/sys): one subprocess.
    for flag in ("--trainer.logger.init_args.save_dir",):
        cmd = fit_args(tmp_path, "--data.prior_dir", str(tmp_path / "w" / "x"), flag, str(ro / "sub"))
        script = f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m dallm " + " ".join(
            f"'{a}'" for a in cmd
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        env.pop("DALLM_TRACEBACK", None)
        result = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-2000:]
        assert lines[-1].startswith(f"dallm: error: {flag} {ro / 'sub'}") and "read-only" in lines[-1]
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "w").exists()


# ------------------------------------------------ every numeric flag of every command: its range (item 17)

# The rule of each numeric flag, written once here and checked against every command's real parser: the
# values 0, -1, nan and a huge one (10^12 for an integer flag, inf for a float one) must be accepted
# exactly when the rule says so, and refused otherwise in one line naming the flag (dallm.ranges).
INT, FLOAT = "int", "float"
RULE = {  # name -> (base, accepts(value))
    "count": (INT, lambda v: v >= 1),  # things to make or use; huge is the user's budget
    "count0": (INT, lambda v: v >= 0),  # 0 = none / off
    "atleast2": (INT, lambda v: v >= 2),  # KID compares pairs
    "seed": (INT, lambda v: 0 <= v <= 2**32 - 1),  # numpy's seed range
    "bool-or-seed": (INT, lambda v: 0 <= v <= 2**32 - 1),
    "bool-or-count0": (INT, lambda v: v >= 0),
    "resolution": (INT, lambda v: 8 <= v <= 6320),  # the largest square image dallm decodes (40 Mpx)
    "rank": (INT, lambda v: 1 <= v <= 32),  # bounded by the tiny base's target layers (preflight.check_rank)
    "count-or-all": (INT, lambda v: v >= 1 or v == -1),  # devices: -1 = all
    "count0-or-all": (INT, lambda v: v >= 0 or v == -1),  # num_sanity_val_steps: -1 = all
    "top_k": (INT, lambda v: v >= -1),  # save_top_k: -1 = all, 0 = none
    "count0-or-unit": (INT, lambda v: v >= 0),  # limit_val_batches: a count (0 = none) or a fraction
    "count-or-fraction": (INT, lambda v: v >= 1),  # val_check_interval: steps, or a fraction of the run (0, 1]
    "one": (FLOAT, lambda v: v == 1),  # limit_train_batches: the whole stream or nothing is refused
    "zero": (FLOAT, lambda v: v == 0),  # overfit_batches: Lightning's overfitting mode replaces dallm's stream
    "precision": (INT, lambda v: False),  # a name (32-true, bf16-mixed, ...), none of these numbers
    "positive": (FLOAT, lambda v: math.isfinite(v) and v > 0),
    "nonneg": (FLOAT, lambda v: math.isfinite(v) and v >= 0),
    "prob": (FLOAT, lambda v: 0 <= v < 1),
    "finite": (FLOAT, lambda v: math.isfinite(v)),
}
TRAINING = {  # fit and validate
    "seed_everything": "bool-or-seed",
    "trainer.devices": "count-or-all", "trainer.num_nodes": "count", "trainer.fast_dev_run": "bool-or-count0",
    "trainer.max_epochs": "count", "trainer.min_epochs": "count0", "trainer.max_steps": "count",
    "trainer.min_steps": "count0", "trainer.limit_train_batches": "one", "trainer.limit_val_batches": "count0-or-unit",
    "trainer.limit_test_batches": "count0-or-unit", "trainer.limit_predict_batches": "count0-or-unit",
    "trainer.overfit_batches": "zero", "trainer.val_check_interval": "count-or-fraction",
    "trainer.check_val_every_n_epoch": "count", "trainer.num_sanity_val_steps": "count0-or-all",
    "trainer.log_every_n_steps": "count", "trainer.accumulate_grad_batches": "count",
    "trainer.gradient_clip_val": "nonneg", "trainer.reload_dataloaders_every_n_epochs": "count0",
    "trainer.precision": "precision",
    "model.rank": "rank", "model.alpha": "positive", "model.lora_dropout": "prob", "model.token_lr": "positive",
    "model.prior_loss_weight": "nonneg", "model.uncond_loss_weight": "nonneg", "model.snr_gamma": "positive",
    "model.noise_offset": "nonneg", "model.hold_weight": "nonneg", "model.ema_decay": "prob",
    "model.instance_guidance_scale": "positive",  # and >= 1, checked at construction (dallm.objective)
    "data.num_teacher_images": "count", "data.num_val_images": "count0", "data.num_prior_images": "count",
    "data.prior_generation_steps": "count", "data.prior_guidance_scale": "nonneg", "data.prior_batch_size": "count",
    "data.resolution": "resolution", "data.batch_size": "count", "data.num_workers": "count0", "data.seed": "seed",
    "checkpoint.save_top_k": "top_k", "checkpoint.every_n_train_steps": "count0", "checkpoint.every_n_epochs": "count0",
    "kid.every_n_steps": "count0", "kid.num_samples": "atleast2", "kid.subset_size": "atleast2", "kid.subsets": "count",
    "kid.num_inference_steps": "count", "kid.guidance_scale": "nonneg", "kid.batch_size": "count", "kid.seed": "seed",
    "kid.feature_batch_size": "count", "early_stopping.patience": "count",
}  # fmt: skip
RULES = {
    "fit": TRAINING,
    "validate": TRAINING,
    "teacher": {
        "n": "count", "val_count": "count0", "val_fraction": "prob", "concurrency": "count", "max_cost": "nonneg",
        "max_refusals": "count", "max_retries": "count0", "max_backoff": "nonneg", "timeout": "positive",
        "seed": "seed", "steps": "count", "guidance_scale": "nonneg", "batch_size": "count",
    },
    "kid": {"subset_size": "atleast2", "subsets": "count", "seed": "seed", "batch_size": "count"},
    "sample": {"steps": "count", "guidance": "nonneg", "lora_scale": "finite", "batch_size": "count",
               "resolution": "resolution"},
    "export": {},
    "report": {},
    "sweep": {
        "seeds": "seed", "max_parallel": "count", "gpus_per_run": "count", "slurm.time": "count",
        "slurm.gpus_per_node": "count0", "slurm.tasks_per_node": "count", "slurm.nodes": "count",
        "slurm.cpus_per_task": "count", "slurm.mem_gb": "count",
    },
}  # fmt: skip


def command_parsers() -> dict:
    """Each command's real parser (sample, export, report: built from the function, as their CLI does)."""
    from jsonargparse import ArgumentParser

    from dallm.cli import build_parser
    from dallm.export.command import export
    from dallm.export.sample import sample
    from dallm.measure.command import kid_parser
    from dallm.sweep.command import sweep_parser
    from dallm.sweep.report import report
    from dallm.teacher.command import teacher_parser

    subs = build_parser()._subcommands_action._name_parser_map
    out = {"fit": subs["fit"], "validate": subs["validate"], "teacher": teacher_parser(), "kid": kid_parser(),
           "sweep": sweep_parser()}  # fmt: skip
    for name, function, positional in (("sample", sample, False), ("export", export, True), ("report", report, True)):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_function_arguments(function, as_group=False, as_positional=positional)
        out[name] = parser
    return out


def _numeric(hint) -> bool:
    import types
    import typing

    if hint is bool or hint is type(None):
        return False
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType, list):
        return any(_numeric(a) for a in typing.get_args(hint))
    return isinstance(hint, type) and issubclass(hint, (int, float))


def numeric_flags(parser) -> dict[str, object]:
    """The numeric flags a user can set (link targets, such as --model.seed, are computed, not set)."""
    linked = {a.dest for a in parser._actions if hasattr(a, "_target")}
    return {
        a.dest: hint
        for a in parser._actions
        if a.dest not in linked and (hint := getattr(a, "_typehint", None) or a.type) is not None and _numeric(hint)
    }


def _required(command: str, tmp: Path) -> list[str]:
    """The flags a command needs to parse at all (nothing is run: only parsed)."""
    return {
        "fit": ["--config", str(TINY), "--model.pretrained_model_name_or_path", str(BASE)],
        "validate": ["--config", str(TINY), "--model.pretrained_model_name_or_path", str(BASE)],
        "teacher": ["--backend", "folder", "--out", str(tmp)],
        "kid": [str(tmp), str(tmp)],
        "sample": ["--lora", str(tmp)],
        "sweep": ["--config", str(TINY)],
    }.get(command, [])


@pytest.mark.slow
def test_every_numeric_flag_of_every_command_has_its_range(tmp_path):
    """0, -1, nan and a huge value for every numeric flag of every command, against the written rule."""
    from dallm import preflight
    from dallm.errors import one_line

    parsers = command_parsers()
    assert set(parsers) == set(RULES) == {"fit", "validate", "teacher", "kid", "sample", "export", "sweep", "report"}
    wrong = []
    for command, parser in parsers.items():
        flags = numeric_flags(parser)
        assert set(flags) == set(RULES[command]), (command, set(flags) ^ set(RULES[command]))
        for flag, hint in flags.items():
            base, accepts = RULE[RULES[command][flag]]
            for text in ("0", "-1", "nan", "1000000000000" if base == INT else "inf"):
                value = "[" + text + "]" if "list[" in str(hint) and "Literal" not in str(hint) else text
                prefix = [command] if command in ("fit", "validate") else []
                args = [*prefix, *_required(command, tmp_path), f"--{flag}", value]
                refusal = None
                try:
                    cfg = parser.parse_args(args[1:] if prefix else args)
                    if command in ("fit", "validate"):  # the checks of flags whose types are Lightning's
                        preflight.check_checkpoint_flags(cfg)
                        if flag == "model.rank":
                            preflight.check_lora_targets(cfg.model)
                except Exception as err:  # noqa: BLE001 (any refusal: judged by its message below)
                    refusal = one_line(err, command)
                expected = accepts(float(text))
                if expected and refusal is not None:
                    wrong.append(f"{command} --{flag} {text}: refused ({refusal})")
                elif not expected and refusal is None:
                    wrong.append(f"{command} --{flag} {text}: accepted")
                elif refusal is not None and (f"--{flag}" not in refusal or "\n" in refusal):
                    wrong.append(f"{command} --{flag} {text}: the refusal names no flag: {refusal}")
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------- the resume contract covers every flag of fit (items 5-7)


def test_every_fit_flag_is_in_the_resume_contract_or_may_change_or_is_declared_safe():
    """A new flag must be put in one list: refused on resume, honoured and printed, or safe with a reason."""
    from dallm import contract
    from dallm.cli import build_parser

    parser = build_parser()._subcommands_action._name_parser_map["fit"]
    dests = {a.dest for a in parser._actions if not a.dest.endswith(".help")}
    sections = {d.split(".")[0] for d in dests if "." in d}
    flags = dests - sections
    groups = {
        "refused (model)": {f"model.{k}" for k in contract.MODEL_CONTRACT},
        "refused (data)": {f"data.{k}" for k in contract.DATA_CONTRACT},
        "refused (recorded)": set(contract.RECORDED_CONTRACT) - {"world_size"},
        "may change": set(contract.MAY_CHANGE),
        "safe": set(contract.SAFE),
        "linked": set(contract.LINKED),
        "not a setting": set(contract.NOT_SETTINGS),
    }
    unclassified = sorted(f for f in flags if not any(f in keys for keys in groups.values()))
    twice = sorted(f for f in flags if sum(f in keys for keys in groups.values()) > 1)
    assert not unclassified and not twice, (unclassified, twice)
    assert set().union(*groups.values()) - {"help"} <= flags  # nothing listed that is no flag


# ------------------------------------------------------------------- teacher images paid once (item 9)


class ImagesServer:
    """A local Images API: POST /v1/images/generations answers `n` images as `url`s (served by it) or b64."""

    def __init__(self, as_url: bool) -> None:
        from pytest_httpserver import HTTPServer

        self.server = HTTPServer(host="127.0.0.1", port=0)
        self.asked: list[int] = []
        self.as_url = as_url
        self.server.expect_request("/v1/images/generations", method="POST").respond_with_handler(self.answer)
        for k in range(1, 4):
            for i in range(3):
                self.server.expect_request(f"/files/{k}_{i}.png").respond_with_data(self.image(i), content_type="image/png")

    @staticmethod
    def image(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (256, 256), (40 * i, 90, 200)).save(buf, format="PNG")
        return buf.getvalue()

    def answer(self, request):
        from werkzeug import Response

        n = request.get_json()["n"]
        self.asked.append(n)
        k = len(self.asked)
        data = [
            {"url": self.server.url_for(f"/files/{k}_{i}.png")} if self.as_url
            else {"b64_json": base64.b64encode(self.image(i)).decode()}
            for i in range(n)
        ]  # fmt: skip
        body = json.dumps({"created": 1_700_000_000, "data": data})
        return Response(body, headers={"x-request-id": f"req_{k}"}, content_type="application/json")

    def args(self, out: Path) -> list[str]:
        return ["teacher", "--backend", "openai", "--model", "dall-e-2", "--prompt", "a cat", "--n", "3",
                "--size", "256x256", "--out", str(out), "--base_url", self.server.url_for("/v1"),
                "--progress", "false"]  # fmt: skip


def listed(out: Path) -> list[str]:
    from dallm.manifest import read_manifest

    return sorted(r["file"] for r in read_manifest(out) if r.get("file"))


def test_openai_url_answers_are_downloaded_and_kept(tmp_path, capsys, monkeypatch):
    """Item 9: an answer with `url` instead of `b64_json` kept 0 of its paid images."""
    api = ImagesServer(as_url=True)
    api.server.start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-printed")
    out = tmp_path / "out"
    try:
        assert main_code(api.args(out)) == 0, capsys.readouterr().err
    finally:
        api.server.stop()
    assert api.asked == [3] and listed(out) == ["000000.png", "000001.png", "000002.png"]
    for i in range(3):  # the pixels served, each with its manifest line
        with Image.open(out / f"00000{i}.png") as im, Image.open(io.BytesIO(api.image(i))) as served:
            assert list(im.convert("RGB").getdata()) == list(served.convert("RGB").getdata())


def test_a_paid_png_without_its_manifest_line_is_adopted_not_bought_again(tmp_path, capsys, monkeypatch):
    """Item 9: a PNG whose manifest line a kill prevented was requested (and paid for) again."""
    api = ImagesServer(as_url=False)
    api.server.start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-printed")
    out = tmp_path / "out"
    try:
        assert main_code(api.args(out)) == 0, capsys.readouterr().err
        # A kill between an image's file and its manifest line leaves exactly this: the last line missing.
        manifest = out / "manifest.jsonl"
        manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))
        capsys.readouterr()
        assert main_code(api.args(out)) == 0
    finally:
        api.server.stop()
    assert api.asked == [3], "an image already paid for was requested again"
    assert "adopted 1 complete image(s)" in capsys.readouterr().out
    assert listed(out) == ["000000.png", "000001.png", "000002.png"]


# ------------------------------------------------------------- cosine T_max follows max_steps (item 18)


def test_cosine_schedule_length_follows_max_steps(capsys):
    from dallm.cli import build_parser, link_cosine_length

    toy = ROOT / "configs" / "toy.yaml"  # cosine with T_max 250 = its max_steps
    cfg = build_parser().parse_args(["fit", "--config", str(toy), "--trainer.max_steps", "2500"]).fit
    assert cfg.model.lr_scheduler.init_args.T_max == 250
    link_cosine_length(cfg)
    assert cfg.model.lr_scheduler.init_args.T_max == 2500
    assert "T_max follows --trainer.max_steps: 2500" in capsys.readouterr().out
    other = build_parser().parse_args(["fit", "--config", str(TINY), "--model.lr_scheduler",
                                       "torch.optim.lr_scheduler.LinearLR"]).fit  # fmt: skip
    before = other.model.lr_scheduler.init_args.as_dict()
    link_cosine_length(other)
    assert other.model.lr_scheduler.init_args.as_dict() == before  # only a cosine has a length to follow


@pytest.mark.slow
def test_export_of_a_run_whose_last_ckpt_is_truncated(tmp_path, capsys):
    """Item 13: `dallm export RUN` takes the newest readable checkpoint, as `fit --ckpt_path last` does."""
    tiny_fit(tmp_path, "--trainer.max_steps", "4")
    run = tmp_path / "logs" / "tiny" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a copy or disk that stopped mid-file
    capsys.readouterr()
    assert main_code(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    out = capsys.readouterr().out
    assert "last.ckpt is unreadable" in out and "using" in out and "step=000004.ckpt" in out
    assert "step 4 of" in out and (tmp_path / "exp" / "pytorch_lora_weights.safetensors").is_file()
    # No readable checkpoint left: the run's own LoRA export (lora/best, else lora/last), saying why.
    for p in (run / "checkpoints").glob("step=*.ckpt"):
        p.write_bytes(b"")
    assert main_code(["export", str(run), "--out", str(tmp_path / "exp2")]) == 0
    out = capsys.readouterr().out
    assert "step=000004.ckpt is unreadable" in out and f"of {run / 'lora' / 'last'}" in out, out
    # Nothing readable at all: one line naming the file.
    shutil.rmtree(run / "lora")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and line.startswith("dallm: error: SOURCE") and "last.ckpt is unreadable" in line


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    """Item 15: a real full file system (a 200 KB tmpfs in a user namespace): the error names the file."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to mount a small file system for this test")
    full = tmp_path / "full"
    full.mkdir()
    src = tmp_path / "src"
    for i in range(3):  # noise does not compress: each PNG is ~190 KB, the second fills the disk
        png(src / f"{i}.png", (256, 256))
        Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(src / f"{i}.png")
    cmd = [sys.executable, "-m", "dallm", "teacher", "--backend", "folder", "--src", str(src),
           "--out", str(full / "out"), "--progress", "false"]  # fmt: skip
    script = f"mount -t tmpfs -o size=200k tmpfs {full} && exec " + " ".join(f"'{a}'" for a in cmd)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("DALLM_TRACEBACK", None)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("dallm: error: [Errno 28] No space left on device: ") and "/full/out/" in lines[-1]
