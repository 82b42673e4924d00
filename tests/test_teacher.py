"""`dallm teacher`: the real `openai` client against a local Images API, the diffusers and folder backends."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from dallm.cli import main
from dallm.data.datamodule import DallmDataModule
from dallm.manifest import lock_directory, read_manifest, sha256_file
from dallm.teacher.command import teacher_main
from dallm.teacher.openai import backoff_seconds, retry_after_seconds
from dallm.teacher.slots import split_counts

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-DALLM-0123456789-do-not-print"
PROMPT = "a realistic painting of a cat in baroque art style"


# ------------------------------------------------------------------------------ a fake Images API


def png_b64(k: int, i: int, size: int | tuple[int, int] = 8) -> str:
    """A PNG (one colour: a few hundred bytes at any size), distinct for (request k, image i)."""
    buf = io.BytesIO()
    wh = (size, size) if isinstance(size, int) else size
    Image.new("RGB", wh, (k * 37 % 256, i * 53 % 256, 99)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def ok(body: dict, k: int) -> Response:
    """The Images API's success: one b64 image per requested n, dall-e-3 with a revised prompt."""
    revised = f"{body['prompt']}, revised {k}" if body["model"] == "dall-e-3" else None
    w, h = (int(v) for v in body["size"].split("x"))  # the size asked for: dallm refuses any other
    data = [{"b64_json": png_b64(k, i, (w, h)), "revised_prompt": revised} for i in range(body.get("n", 1))]
    return json_response({"created": 1_700_000_000 + k, "data": data}, k)


def json_response(payload: object, k: int, status: int = 200, headers: dict | None = None) -> Response:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    headers = {"x-request-id": f"req_{k}", **(headers or {})}
    return Response(text, status=status, headers=headers, content_type="application/json")


def listed_pngs(out: Path) -> set[str]:
    """PNG files of a teacher dir that its manifest lists: the images a run kept."""
    if not (out / "manifest.jsonl").exists():
        return set()
    return {r["file"] for r in read_manifest(out) if r.get("file")} & set(pngs(out))


def error(status: int, code: str | None, message: str, headers: dict | None = None) -> Callable:
    """OpenAI's error body, e.g. 400 content_policy_violation or 429 rate_limit_exceeded."""
    body = {"error": {"code": code, "message": message, "type": "invalid_request_error", "param": None}}
    return lambda _body, k: json_response(body, k, status, headers)


class ImagesAPI:
    """POST /v1/images/generations on a real HTTP server; request k answers with `script.get(k, ok)`."""

    def __init__(self, server: HTTPServer) -> None:
        self.requests: list[dict] = []  # json body + "t" (arrival time) + "auth"
        self.script: dict[int, Callable[[dict, int], Response]] = {}
        self.default: Callable[[dict, int], Response] = ok
        self.delay = 0.0
        self.delays: dict[int, float] = {}  # request k answers after delays[k] instead of `delay`
        self.hold_from: int | None = None  # requests k >= hold_from wait for `release` (a kill lands there)
        self.release = threading.Event()
        self._lock = threading.Lock()
        server.expect_request("/v1/images/generations", method="POST").respond_with_handler(self)
        self.url = server.url_for("/v1")

    def __call__(self, request: Request) -> Response:
        body = request.get_json()
        with self._lock:
            k = len(self.requests)
            self.requests.append(
                {**body, "t": time.monotonic(), "auth": request.headers.get("Authorization")}
            )
        time.sleep(self.delays.get(k, self.delay))
        if self.hold_from is not None and k >= self.hold_from:
            self.release.wait(120)
        return self.script.get(k, self.default)(body, k)

    @property
    def asked(self) -> int:
        """Images asked for, over all requests."""
        return sum(r.get("n", 1) for r in self.requests)


@pytest.fixture(scope="module")
def server():
    s = HTTPServer(host="127.0.0.1", port=0, threaded=True)  # threaded: --concurrency really overlaps
    s.start()
    yield s
    s.clear()
    if s.is_running():
        s.stop()


@pytest.fixture
def api(server, monkeypatch) -> ImagesAPI:
    server.clear()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("DALLM_TRACEBACK", raising=False)
    return ImagesAPI(server)


def teacher(capsys, *args: str) -> tuple[int, str, str]:
    """`dallm teacher ARGS` through cli.main, so errors pass the one boundary every command shares."""
    try:
        code = main(["teacher", *args, "--progress", "false"])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def openai_args(api: ImagesAPI, out: Path, model: str, n: int, *extra: str) -> list[str]:
    return ["--backend", "openai", "--model", model, "--prompt", PROMPT, "--n", str(n), "--out", str(out)] + [
        "--base_url",
        api.url,
        *extra,
    ]


def pngs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.png"))


def check_manifest(directory: Path) -> list[dict]:
    """Every image record names an existing file with its sha256; returns the image records."""
    records = [r for r in read_manifest(directory) if r.get("file")]
    for r in records:
        assert sha256_file(directory / r["file"]) == r["sha256"], r["file"]
    assert sorted({r["file"] for r in records}) == pngs(directory)
    return records


def assert_no_key(out: Path, *texts: str) -> None:
    for text in texts:
        assert KEY not in text
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------------------------ pure helpers


def test_split_counts_and_retry_helpers():
    assert split_counts(70, 20, None) == (50, 20)
    assert split_counts(10, None, 0.25) == (7, 3)  # 2.5 rounds up
    with pytest.raises(ValueError, match="--val_count 5 leaves no training images"):
        split_counts(5, 5, None)
    with pytest.raises(ValueError, match="set only one"):
        split_counts(5, 1, 0.1)
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert retry_after_seconds({}) is None and retry_after_seconds({"Retry-After": "soon"}) is None
    import random

    rng = random.Random(0)
    waits = [backoff_seconds(a, 5.0, rng) for a in range(6)]
    assert all(0.5 * min(5.0, 2.0**a) <= w <= min(5.0, 2.0**a) for a, w in enumerate(waits))


# -------------------------------------------------------------------------------------- openai: ok


@pytest.mark.parametrize(
    ("model", "n", "extra", "asked", "sent", "usd"),
    [
        ("dall-e-2", 23, [], [10, 10, 3], {"size": "512x512", "response_format": "b64_json"}, "0.41"),
        (
            "dall-e-3",
            3,
            ["--quality", "hd", "--style", "natural"],
            [1, 1, 1],
            {"size": "1024x1024", "quality": "hd", "style": "natural", "response_format": "b64_json"},
            "0.24",
        ),
        ("gpt-image-1", 12, ["--quality", "low"], [10, 2], {"size": "1024x1024", "quality": "low"}, "0.13"),
    ],
)
def test_openai_batches_per_model_and_writes_images_with_manifest(
    api, tmp_path, capsys, model, n, extra, asked, sent, usd
):
    out = tmp_path / "teacher"
    code, stdout, stderr = teacher(capsys, *openai_args(api, out, model, n, "--val_count", "2", *extra))
    assert code == 0, stderr
    assert sorted(r["n"] for r in api.requests) == sorted(asked)
    for r in api.requests:
        assert r["model"] == model and r["prompt"] == PROMPT and r["auth"] == f"Bearer {KEY}"
        assert {k: r.get(k) for k in sent} == sent
        assert set(r) - {"t", "auth"} == {"model", "prompt", "n", *sent}  # nothing a model does not take
    assert f"to request      {n} in {len(asked)} request" in stdout and f"estimated cost  ${usd}" in stdout
    assert pngs(out) == [f"{i:06d}.png" for i in range(n - 2)] and pngs(out / "val") == [
        "000000.png",
        "000001.png",
    ]
    records = check_manifest(out) + check_manifest(out / "val")
    assert {r["request_id"] for r in records} <= {f"req_{k}" for k in range(len(asked))}
    for r in records:
        assert r["backend"] == "openai" and r["model"] == model and r["prompt"] == PROMPT
        assert r["size"] == sent["size"] and r["created"].startswith("2023-11-14")
        assert (r["revised_prompt"] is not None) == (model == "dall-e-3")
    assert f"{n} of {n} images" in stdout
    assert_no_key(out, stdout, stderr)

    # The same command again asks for nothing; the DataModule trains on OUT and validates on OUT/val.
    code, stdout, _ = teacher(capsys, *openai_args(api, out, model, n, "--val_count", "2", *extra))
    assert code == 0 and "nothing to do" in stdout and len(api.requests) == len(asked)
    dm = DallmDataModule(teacher_dir=str(out), instance_prompt="{prompt} like <s1><s2>", resolution=8)
    assert len(dm.train_teacher_paths) == n - 2 and len(dm.val_teacher_paths) == 2
    assert set(dm.train_teacher_prompts) == {f"{PROMPT} like <s1><s2>"}


# ---------------------------------------------------------------------------------- openai: errors


def test_429_retry_after_holds_back_every_worker(api, tmp_path, capsys):
    # Request 0 is refused at once; request 1, already on its way, is answered 0.5 s later: by then the
    # client has long read the 429, so a worker that ignored the shared hold would ask again at ~0.5 s.
    # (With equal delays the two answers raced: the test depended on which thread the machine ran first.)
    api.delays = {1: 0.5}
    api.script[0] = error(429, "rate_limit_exceeded", "Rate limit reached", {"Retry-After": "1"})
    out = tmp_path / "t"
    args = openai_args(api, out, "dall-e-3", 4, "--concurrency", "2", "--max_backoff", "0")
    code, _, stderr = teacher(capsys, *args)
    assert code == 0, stderr
    assert len(pngs(out)) == 4 and len(api.requests) == 5
    # Request 1 was already on its way; every later one, from either worker, waited for Retry-After
    # (the backoff cap is 0, so only the header can explain the wait).
    t429 = api.requests[0]["t"]
    assert all(r["t"] >= t429 + 0.95 for r in api.requests[2:]), [r["t"] - t429 for r in api.requests]
    assert "request req_0: HTTP 429 rate_limit_exceeded: retry 1 of 6 in 1.0 s (Retry-After)" in stderr


def test_500_is_retried_with_backoff_and_a_request_that_gives_up_leaves_a_hole_to_resume(
    api, tmp_path, capsys
):
    out = tmp_path / "t"
    out.mkdir()
    # What a kill leaves behind: a temp file, and a renamed image whose manifest line was never written.
    (out / ".000002.png.x1y2.tmp").write_bytes(b"half a png")
    Image.new("RGB", (8, 8)).save(out / "000001.png")
    api.script[0] = api.script[1] = error(500, None, "The server had an error")
    code, stdout, stderr = teacher(capsys, *openai_args(api, out, "dall-e-2", 3, "--max_backoff", "0.01"))
    assert code == 0, stderr
    assert len(api.requests) == 3 and api.requests[-1]["n"] == 3 and "(2 retries)" in stdout
    assert "replacing       1 file(s) without a manifest record" in stdout and "000001.png" in stdout
    assert len(check_manifest(out)) == 3 and not list(out.glob(".*.tmp"))

    out = tmp_path / "t2"
    api.requests.clear()
    api.script = {1: error(502, None, "Bad gateway"), 2: error(503, None, "Unavailable")}
    args = openai_args(
        api, out, "dall-e-3", 3, "--concurrency", "1", "--max_retries", "1", "--max_backoff", "0"
    )
    code, stdout, stderr = teacher(capsys, *args)
    assert code == 1 and "gave up after 2 attempts" in stderr and "run the same command again" in stderr
    assert pngs(out) == ["000000.png", "000002.png"]  # the run went on past the failed image
    asked = api.asked
    code, stdout, stderr = teacher(capsys, *args)
    assert code == 0 and api.asked - asked == 1 and pngs(out) == ["000000.png", "000001.png", "000002.png"]
    check_manifest(out)


def test_content_policy_refusal_is_recorded_counted_and_stops_after_max_refusals(api, tmp_path, capsys):
    api.script[0] = error(400, "content_policy_violation", "Your request was rejected by our safety system.")
    out = tmp_path / "t"
    code, stdout, stderr = teacher(capsys, *openai_args(api, out, "dall-e-3", 2, "--concurrency", "1"))
    assert code == 0, stderr
    assert len(api.requests) == 3 and len(pngs(out)) == 2 and "content-policy refusals 1" in stdout
    refusals = [r for r in read_manifest(out) if r.get("refusal")]
    assert len(refusals) == 1 and "file" not in refusals[0]
    assert refusals[0]["request_id"] == "req_0" and refusals[0]["code"] == "content_policy_violation"
    check_manifest(out)

    api.requests.clear()
    api.default = error(400, "content_policy_violation", "Your request was rejected by our safety system.")
    out = tmp_path / "t2"
    code, stdout, stderr = teacher(capsys, *openai_args(api, out, "dall-e-2", 5, "--max_refusals", "2"))
    assert code == 1 and len(api.requests) == 2 and pngs(out) == []
    assert "stopped after 2 content-policy refusals" in stdout
    assert sum(1 for r in read_manifest(out) if r.get("refusal")) == 2


def test_malformed_b64_or_json_names_the_request_and_keeps_the_other_images(api, tmp_path, capsys):
    def bad_item(body, k):
        data = [{"b64_json": png_b64(k, i, 512)} for i in range(body["n"])]
        data[2]["b64_json"] = "!!! not base64 !!!"
        return json_response({"created": 1_700_000_000, "data": data}, k)

    api.script[0] = bad_item
    out = tmp_path / "t"
    args = openai_args(api, out, "dall-e-2", 4)
    code, _, stderr = teacher(capsys, *args)
    assert code == 1 and "request req_0: image 2 of the response is malformed: invalid base64" in stderr
    assert pngs(out) == ["000000.png", "000001.png", "000003.png"]

    api.script[1] = lambda body, k: json_response('{"created": 1, "data": [', k)
    code, _, stderr = teacher(capsys, *args)
    assert code == 1 and "request req_1: malformed response, not JSON" in stderr
    assert api.requests[1]["n"] == 1 and len(pngs(out)) == 3

    code, _, stderr = teacher(capsys, *args)
    assert code == 0 and api.requests[2]["n"] == 1 and len(pngs(out)) == 4
    check_manifest(out)


def test_401_stops_at_once_and_the_key_never_appears(api, tmp_path, capsys):
    # A worst-case server that echoes the whole key in its error message.
    api.default = error(401, "invalid_api_key", f"Incorrect API key provided: {KEY}.")
    out = tmp_path / "t"
    code, stdout, stderr = teacher(capsys, *openai_args(api, out, "dall-e-3", 10))
    assert code == 2 and 1 <= len(api.requests) <= 4  # only what was in flight with --concurrency 4
    assert "dallm: error: stopped: request req_" in stderr and "HTTP 401 invalid_api_key" in stderr
    assert "<OPENAI_API_KEY>" in stderr
    assert_no_key(out, stdout, stderr)


def test_refused_before_any_request(api, tmp_path, capsys, monkeypatch):
    out = tmp_path / "t"
    args = openai_args(api, out, "dall-e-2", 70, "--val_count", "20")

    code, stdout, stderr = teacher(capsys, *args, "--max_cost", "1.00")
    assert code == 2 and "$1.26" in stdout and "--max_cost 1.00: the plan is estimated at $1.26" in stderr

    for bad, message in [
        (["--quality", "hd"], "--quality does not apply to dall-e-2"),
        (["--size", "1792x1024"], "--size 1792x1024 is not offered by dall-e-2"),
        (["--concurrency", "0"], "--concurrency must be >= 1, got 0"),
        (["--src", str(tmp_path)], "--src is for --backend folder"),
    ]:
        code, _, stderr = teacher(capsys, *args, *bad)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr

    code, stdout, stderr = teacher(capsys, *openai_args(api, out, "dall-e-2", 1))
    assert code == 0 and len(api.requests) == 1
    code, _, stderr = teacher(capsys, *[a if a != PROMPT else "a photo of a dog" for a in args])
    assert code == 2 and "holds images made with prompt" in stderr and "--prompt 'a photo of a dog'" in stderr
    code, _, stderr = teacher(capsys, *[a if a != "dall-e-2" else "dall-e-3" for a in args])
    assert code == 2 and "--model 'dall-e-3'" in stderr

    with lock_directory(out):  # as if another run were filling it
        code, _, stderr = teacher(capsys, *args)
    assert code == 2 and "being filled by another running process" in stderr

    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(SystemExit) as exit_info:
        main(["teacher", *args])  # through the `dallm` entry point
    assert exit_info.value.code == 2 and "OPENAI_API_KEY is not set" in capsys.readouterr().err
    assert len(api.requests) == 1


@pytest.mark.slow
def test_killed_run_resumes_without_asking_twice(api, tmp_path, capsys):
    """SIGKILL a real `python -m dallm teacher` mid-way, then run it again: exactly --n images."""
    api.hold_from = 3  # three images arrive; requests 3 and 4 are in flight, unanswered, at the kill
    out = tmp_path / "t"
    args = openai_args(api, out, "dall-e-3", 10, "--val_count", "2", "--concurrency", "2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dallm", "teacher", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # A state the run reaches however slow the machine: three images kept, two requests held.
        while not (len(api.requests) == 5 and len(listed_pngs(out)) == 3):
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        api.hold_from = None
        api.release.set()
    assert KEY.encode() not in proc.stdout.read()
    present = len(listed_pngs(out))
    assert present == 3 and not any(out.glob("val/*.png"))
    asked_before = api.asked

    code, stdout, stderr = teacher(capsys, *args)
    assert code == 0, stderr
    assert f"present         {present}" in stdout
    assert api.asked - asked_before == 10 - present  # nothing on disk was asked for again
    assert len(pngs(out)) == 8 and len(pngs(out / "val")) == 2
    assert len(check_manifest(out)) == 8 and len(check_manifest(out / "val")) == 2
    assert not list(out.rglob(".*.tmp"))
    assert_no_key(out, stdout, stderr)


# ----------------------------------------------------------------------------- diffusers and folder


@pytest.fixture
def one_thread():
    # A 32x32 model is all thread overhead: with 2 threads on 2 busy cores one call took 6 s, with 1, 0.06 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_diffusers_backend_records_seeds_and_fills_only_missing_images(
    tiny_model_dir, tmp_path, capsys, one_thread
):
    out = tmp_path / "t"
    args = [
        "--backend",
        "diffusers",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "a red circle",
        "--out",
        str(out),
    ]
    args += ["--n", "3", "--val_count", "1", "--steps", "2", "--batch_size", "2", "--seed", "7"]
    code, stdout, stderr = teacher(capsys, *args)
    assert code == 0, stderr
    assert "to generate     3" in stdout
    train, val = check_manifest(out), check_manifest(out / "val")
    assert [r["seed"] for r in train] == [7, 8] and [r["seed"] for r in val] == [1_000_007]
    for r in train + val:
        assert r["backend"] == "diffusers" and r["model"] == str(tiny_model_dir) and r["size"] == "32x32"
        assert r["prompt"] == "a red circle" and r["steps"] == 2

    first = (out / "000001.png").read_bytes()
    (out / "000001.png").unlink()
    code, stdout, _ = teacher(capsys, *args)
    assert code == 0 and "present         2" in stdout and "to generate     1" in stdout
    train = check_manifest(out)
    assert train[-1]["file"] == "000001.png" and train[-1]["seed"] == 8
    a, b = (
        np.asarray(Image.open(io.BytesIO(x)), dtype=int) for x in (first, (out / "000001.png").read_bytes())
    )
    assert np.abs(a - b).max() <= 2  # same seed, same image (a batch of 1 instead of 2: float rounding)

    code, _, stderr = teacher(capsys, *args[:-2], "--seed", "6")
    assert code == 0  # nothing missing: the seed is not even looked at
    (out / "000001.png").unlink()
    code, _, stderr = teacher(capsys, *args[:-2], "--seed", "6")
    assert code == 2 and "would get seed 7, which" in stderr and "000000.png already has" in stderr
    code, _, stderr = teacher(capsys, *args, "--steps", "3")
    assert code == 2 and "holds images made with steps 2" in stderr


def test_folder_backend_converts_odd_images_and_skips_a_corrupt_one(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGBA", (10, 6), (255, 0, 0, 0)).save(src / "a_rgba.png")
    Image.new("L", (7, 7), 77).save(src / "b_gray.png")
    (src / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("RGB", (9, 9), (10, 200, 30)).save(src / "d_photo.jpg")
    Image.fromarray(np.full((5, 5), 65535, dtype=np.uint16)).save(src / "e_16bit.png")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "t"
    args = [
        "--backend",
        "folder",
        "--src",
        str(src),
        "--out",
        str(out),
        "--val_count",
        "1",
        "--prompt",
        PROMPT,
    ]
    code, stdout, stderr = teacher(capsys, *args)
    assert code == 0, stderr
    assert "skipping a corrupt image" in stderr and "c_broken.png" in stderr
    assert "to import       4" in stdout
    train, val = check_manifest(out), check_manifest(out / "val")
    assert [Path(r["source"]).name for r in train + val] == [
        "a_rgba.png",
        "b_gray.png",
        "d_photo.jpg",
        "e_16bit.png",
    ]
    for r in train + val:
        assert r["backend"] == "folder" and r["prompt"] == PROMPT
    images = [Image.open(p) for p in [*sorted(out.glob("*.png")), out / "val/000000.png"]]
    assert all(im.format == "PNG" and im.mode == "RGB" for im in images)
    assert images[0].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert images[1].getpixel((0, 0)) == (77, 77, 77) and images[3].getpixel((0, 0)) == (255, 255, 255)

    code, stdout, _ = teacher(capsys, *args)
    assert code == 0 and "nothing to do" in stdout
    code, _, stderr = teacher(capsys, *[a if a != PROMPT else "other" for a in args])
    assert code == 2 and "--prompt 'other'" in stderr


def test_help_is_generated_from_the_signature_and_docstring(capsys):
    with pytest.raises(SystemExit) as exit_info:
        teacher_main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "Collect teacher images into --out" in help_text and "Exit status: 0 when" in help_text
    for flag in ("--backend", "--max_refusals", "--revision", "--variant", "--src", "--progress"):
        assert flag in help_text
    assert "stop after this many content-policy refusals" in " ".join(help_text.split())


def test_flags_of_one_backend_are_refused_by_the_others(api, tmp_path, capsys):
    out = tmp_path / "t"
    base = openai_args(api, out, "dall-e-2", 2)
    for bad, message in [
        (["--revision", "main"], "--revision is for --backend diffusers only, not openai"),
        (["--n", "0"], "--n must be >= 1 or null, got 0"),
        (["--max_backoff", "-1"], "--max_backoff must be finite and >= 0, got -1"),
    ]:
        code, _, stderr = teacher(capsys, *base, *bad)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    folder = ["--backend", "folder", "--src", str(tmp_path), "--out", str(out)]
    code, _, stderr = teacher(capsys, *folder, "--size", "8x8")
    assert code == 2 and "--size does not apply to --backend folder" in stderr
    code, _, stderr = teacher(capsys, *folder, "--quality", "hd")
    assert code == 2 and "--quality is for --backend openai only, not folder" in stderr
    code, _, stderr = teacher(
        capsys, "--backend", "diffusers", "--out", str(out), "--prompt", "p", "--n", "1"
    )
    assert code == 2 and "--model is required with --backend diffusers" in stderr
    assert api.requests == [] and not out.exists()  # refused before anything was touched
