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
import os
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


def fake_checkpoint(path: Path, schedulers: list | None = None, **changes) -> Path:
    """A checkpoint holding what Lightning stores for the tiny config (hparams, optimizer groups), no weights.

    The resume contract is checked from these fields before anything loads the weights, so this is all a
    refusal needs; the slow test below refuses a real checkpoint too.
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
        },
        path,
    )
    return path


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


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DALLM_TRACEBACK", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens: no request may go out
    make_args, match = CASES[case]
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
    assert len(CASES) >= 50


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
    tiny_fit(tmp_path)
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
