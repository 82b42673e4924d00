"""`dallm teacher`: collect teacher images into a directory, resumably, from one of three backends.

- `openai`: DALL-E 2/3 or gpt-image-1 through the Images API (`dallm.openai_teacher`);
- `diffusers`: any diffusers text-to-image pipeline (`generate_with_pipeline`, which also makes the
  DataModule's prior-preservation class images);
- `folder`: images that already exist, validated and converted to RGB PNG.

The directory layout, what counts as present and the plan are in `dallm.teacher_dir`; the manifest
and atomic writes in `dallm.manifest`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from dallm.manifest import (
    append_manifest,
    lock_directory,
    remove_stale_temp_files,
    save_png_atomic,
    sha256_file,
    utc_now,
)
from dallm.teacher_dir import (
    VAL_DIR,
    DirState,
    Plan,
    Slot,
    check_seeds,
    scan,
    split_counts,
    wanted_slots,
)

if TYPE_CHECKING:
    from dallm.openai_teacher import OpenAIRequest

# ------------------------------------------------------------------------------- diffusers backend


def model_id(name: str) -> str:
    """How a model is recorded: a local directory resolved, so "./sd" and "/abs/sd" are the same model."""
    return str(Path(name).resolve()) if name and os.path.isdir(name) else name


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of `from_pretrained`: newer diffusers deprecate `torch_dtype` for `dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def consecutive_runs(indices: Iterable[int]) -> list[list[int]]:
    """Split sorted indices into runs of consecutive ones: [0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def load_text2image_pipeline(model: str, device: str | None = None) -> Any:
    """Any diffusers text-to-image pipeline (hub id or local directory), fp16 on CUDA, fp32 on the CPU."""
    from diffusers import AutoPipelineForText2Image

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(model, **dtype_kwarg(dtype))
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {model}: cannot load a diffusers text-to-image pipeline: {err}") from err
    return pipe.to(device)


def generate_with_pipeline(
    pipe: Any,
    prompt: str,
    out_dir: str | Path,
    seeds: list[int],
    start_index: int,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    batch_size: int,
    model: str,
    negative_prompt: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate one image per seed with a diffusers text-to-image pipeline into `out_dir`.

    Image k is saved as `out_dir/{start_index + k:06d}.png`, then its manifest record is appended.
    Every image gets its own `torch.Generator` seeded with its seed, so an image depends on its seed,
    not on the batch it was generated in (up to float rounding of batched kernels). `height`/`width`
    None leave the size to the pipeline's default.

    Returns:
        The paths written, in seed order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)  # one bar over images below, not one per batch
    scheduler = type(pipe.scheduler).__name__

    from tqdm.auto import tqdm

    paths: list[Path] = []
    with tqdm(total=len(seeds), desc=f"generating {out_dir.name}", unit="img", disable=not progress) as bar:
        for start in range(0, len(seeds), batch_size):
            batch_seeds = [int(s) for s in seeds[start : start + batch_size]]
            b = len(batch_seeds)
            kwargs: dict[str, Any] = {}
            if negative_prompt is not None:
                kwargs["negative_prompt"] = [negative_prompt] * b
            images = pipe(
                prompt=[prompt] * b,
                generator=[torch.Generator(device=pipe.device).manual_seed(s) for s in batch_seeds],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                output_type="pil",
                **kwargs,
            ).images
            for k, (image, seed) in enumerate(zip(images, batch_seeds, strict=True)):
                path = out_dir / f"{start_index + start + k:06d}.png"
                sha = save_png_atomic(image, path)
                append_manifest(
                    out_dir,
                    {
                        "file": path.name,
                        "sha256": sha,
                        "backend": "diffusers",
                        "model": model,
                        "prompt": prompt,
                        "negative_prompt": negative_prompt,
                        "seed": seed,
                        "scheduler": scheduler,
                        "steps": num_inference_steps,
                        "guidance_scale": guidance_scale,
                        "size": f"{image.width}x{image.height}",
                        "created": utc_now(),
                    },
                )
                paths.append(path)
            bar.update(b)
    return paths


# ---------------------------------------------------------------------------------- folder backend


def validate_sources(src: str, n: int | None) -> tuple[list[tuple[Path, str]], list[str]]:
    """The first `n` (all if None) readable images of `src` by name, with their sha256; and the errors.

    A corrupt or unreadable file is reported and skipped, not fatal: one broken download should not
    block importing the others.
    """
    from dallm.data import list_images, load_rgb  # here, not on top: dallm.data imports this module

    valid: list[tuple[Path, str]] = []
    errors: list[str] = []
    for path in list_images(src, "--src"):
        if n is not None and len(valid) == n:
            break
        try:
            load_rgb(path)
        except ValueError as err:
            errors.append(str(err))
            continue
        valid.append((path, sha256_file(path)))
    return valid, errors


def import_folder(
    sources: list[tuple[Path, str]], slots: list[Slot], state: DirState, prompt: str | None, progress: bool
) -> int:
    """Convert source k to RGB PNG in slot k unless it is there already; returns the number written."""
    from tqdm.auto import tqdm

    from dallm.data import load_rgb

    for slot, (src, sha) in zip(slots, sources, strict=True):
        record = state.records.get(slot.directory, {}).get(slot.path.name)
        if slot in state.present and record is not None and record.get("source_sha256") != sha:
            raise ValueError(
                f"--src: {slot.label} of --out was imported from {record.get('source')}, but now {src} "
                "would go there (did the --src folder change?): use an empty --out"
            )
    todo = [(slot, source) for slot, source in zip(slots, sources, strict=True) if slot not in state.present]
    for slot, (src, sha) in tqdm(todo, desc="importing", unit="img", disable=not progress):
        image = load_rgb(src)
        slot.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "file": slot.path.name,
            "sha256": save_png_atomic(image, slot.path),
            "backend": "folder",
            "model": None,
            "prompt": prompt,
            "source": str(src.resolve()),
            "source_sha256": sha,
            "size": f"{image.width}x{image.height}",
            "created": utc_now(),
        }
        append_manifest(slot.directory, record)
    return len(todo)


# -------------------------------------------------------------------------------------------- CLI


def _teacher_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="dallm teacher",
        description=(
            "Collect teacher images into --out (OUT/000000.png ..., held-out ones in OUT/val/, each folder "
            "with a manifest.jsonl). Re-running the same command makes only the missing images. The OpenAI "
            "key is read from OPENAI_API_KEY only."
        ),
    )
    parser.add_argument(
        "--backend",
        type=Literal["openai", "diffusers", "folder"],
        required=True,
        help="openai: the Images API; diffusers: a diffusers text-to-image pipeline; folder: import --src.",
    )
    parser.add_argument(
        "--out", type=str, required=True, help="Teacher directory to fill (created if missing)."
    )
    parser.add_argument(
        "--prompt", type=str | None, default=None, help="The prompt (required for openai and diffusers)."
    )
    parser.add_argument(
        "--n",
        type=int | None,
        default=None,
        help="Images wanted, held-out ones included (folder: default all).",
    )
    parser.add_argument(
        "--val_count", type=int | None, default=None, help="Of --n, this many are held out in OUT/val/."
    )
    parser.add_argument(
        "--val_fraction",
        type=float | None,
        default=None,
        help="Or hold out n * fraction images (rounded half up).",
    )
    parser.add_argument(
        "--model",
        type=str | None,
        default=None,
        help="openai: dall-e-2, dall-e-3 or gpt-image-1; diffusers: a hub id or a local pipeline directory.",
    )
    parser.add_argument(
        "--size",
        type=str | None,
        default=None,
        help="WxH. openai default: 512x512 (dall-e-2), 1024x1024 (dall-e-3, gpt-image-1); diffusers: the "
        "pipeline's default.",
    )
    parser.add_argument(
        "--quality",
        type=str | None,
        default=None,
        help="openai: standard|hd (dall-e-3, default standard), low|medium|high|auto (gpt-image-1, default auto).",
    )
    parser.add_argument(
        "--style", type=str | None, default=None, help="openai: vivid|natural (dall-e-3 only, default vivid)."
    )
    parser.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight at once.")
    parser.add_argument(
        "--base_url",
        type=str | None,
        default=None,
        help="openai: API base URL (default: $OPENAI_BASE_URL, then api.openai.com).",
    )
    parser.add_argument(
        "--max_cost", type=float | None, default=None, help="openai: refuse plans estimated above this (USD)."
    )
    parser.add_argument(
        "--max_refusals",
        type=int,
        default=5,
        help="openai: stop after this many content-policy refusals (each is recorded in the manifest).",
    )
    parser.add_argument(
        "--max_retries",
        type=int,
        default=6,
        help="openai: retries of one request after 429, 5xx or a dropped connection.",
    )
    parser.add_argument(
        "--max_backoff",
        type=float,
        default=60.0,
        help="openai: cap in seconds of the exponential backoff used when the server sends no Retry-After.",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="openai: seconds to wait for one response."
    )
    parser.add_argument("--seed", type=int, default=0, help="diffusers: training image i uses seed + i.")
    parser.add_argument("--steps", type=int, default=30, help="diffusers: sampling steps.")
    parser.add_argument(
        "--guidance_scale", type=float, default=7.5, help="diffusers: classifier-free guidance."
    )
    parser.add_argument(
        "--negative_prompt", type=str | None, default=None, help="diffusers: negative prompt."
    )
    parser.add_argument("--batch_size", type=int, default=4, help="diffusers: images per pipeline call.")
    parser.add_argument(
        "--device",
        type=str | None,
        default=None,
        help="diffusers: cuda, cpu, ... (default: cuda if available).",
    )
    parser.add_argument(
        "--src", type=str | None, default=None, help="folder: the directory of images to import."
    )
    parser.add_argument("--progress", type=bool, default=True, help="Show a progress bar (on stderr).")
    return parser


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if not m or min(int(m[1]), int(m[2])) < 8:
        raise ValueError(f"--size must be WxH, e.g. 512x512, got {size!r}")
    return int(m[2]), int(m[1])  # (height, width)


def _check_flags(cfg: Any) -> None:
    """Flag combinations that are wrong whatever is on disk, before anything else happens."""
    backend = cfg.backend
    if backend in ("openai", "diffusers"):
        for flag in ("prompt", "n", "model"):
            if cfg[flag] is None or cfg[flag] == "":
                raise ValueError(f"--{flag} is required with --backend {backend}")
        if cfg.src is not None:
            raise ValueError(f"--src is for --backend folder, not {backend}")
    if backend == "folder":
        if cfg.src is None:
            raise ValueError("--src is required with --backend folder")
        if cfg.model is not None:
            raise ValueError("--model does not apply to --backend folder")
        if cfg.n is not None and cfg.n < 1:
            raise ValueError(f"--n must be >= 1, got {cfg.n}")
    if backend != "openai":
        for flag in ("quality", "style", "base_url", "max_cost"):
            if cfg[flag] is not None:
                raise ValueError(f"--{flag} applies to --backend openai only")
    else:
        for flag, low in (("concurrency", 1), ("max_refusals", 1), ("max_retries", 0)):
            if cfg[flag] < low:
                raise ValueError(f"--{flag} must be >= {low}, got {cfg[flag]}")
        for flag in ("max_backoff", "timeout"):
            if cfg[flag] < 0:
                raise ValueError(f"--{flag} must be >= 0, got {cfg[flag]}")
    if backend == "diffusers":
        for flag in ("steps", "batch_size"):
            if cfg[flag] < 1:
                raise ValueError(f"--{flag} must be >= 1, got {cfg[flag]}")
        _parse_size(cfg.size)
    if backend == "folder" and cfg.size is not None:
        raise ValueError("--size does not apply to --backend folder (images are imported at their size)")


def teacher_main(argv: list[str]) -> int:
    """`dallm teacher --backend openai|diffusers|folder --out DIR ...`: fill DIR with teacher images.

    Prints the plan (wanted, present, to make, estimated cost) before the first request, a progress bar
    on stderr, and a summary. Returns 0 when every wanted image is present, 1 when the run ended with
    images still missing (failed requests, too many refusals: re-run the same command), 2 on bad input,
    a refused plan (--max_cost) or an error that stops the run (401, unknown model, ...), reported on
    one line `dallm teacher: error: ...`. DALLM_TRACEBACK=1 shows the traceback instead.
    """
    cfg = _teacher_parser().parse_args(argv)  # usage errors: jsonargparse prints them and exits 2
    key = os.environ.get("OPENAI_API_KEY", "")
    try:
        return _run(cfg, key)
    except (ValueError, OSError, RuntimeError) as err:
        if os.environ.get("DALLM_TRACEBACK"):
            raise
        from dallm.openai_teacher import redact

        message = " ".join(redact(str(err), key).split())  # one line, whatever the library's looked like
        print(f"dallm teacher: error: {message}", file=sys.stderr)
        return 2


def _run(cfg: Any, key: str) -> int:
    _check_flags(cfg)
    request = None
    if cfg.backend == "openai":
        from dallm.openai_teacher import resolve_request

        request = resolve_request(cfg.model, cfg.prompt, cfg.size, cfg.quality, cfg.style)
        if not key.strip():
            raise ValueError(
                "OPENAI_API_KEY is not set: export it (the key is read from the environment only, so that it "
                "never lands in shell history, configs or logs); nothing was requested"
            )
    if cfg.backend == "folder":
        from dallm.data import list_images

        list_images(cfg.src, "--src")  # a missing --src fails before --out is created
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out: {out} is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with lock_directory(out):  # released on return, and by the OS if the process is killed
        for d in (out, out / VAL_DIR):
            remove_stale_temp_files(d)
        return _fill(cfg, key, request, out)


def _settings(cfg: Any, request: OpenAIRequest | None) -> tuple[dict[str, Any], str]:
    """The manifest fields every image of the directory must share, and a short description of the source."""
    if request is not None:
        return request.settings(), f"openai {request.model} {request.size}"
    if cfg.backend == "folder":
        return {"backend": "folder", "prompt": cfg.prompt}, f"folder {cfg.src}"
    settings = {
        "backend": "diffusers",
        "model": model_id(cfg.model),
        "prompt": cfg.prompt,
        "negative_prompt": cfg.negative_prompt,
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
    }
    if cfg.size is not None:  # without --size the pipeline's default, recorded as the image's size
        settings["size"] = cfg.size
    return settings, f"diffusers {cfg.model}, {cfg.steps} steps, guidance {cfg.guidance_scale}"


def _fill(cfg: Any, key: str, request: OpenAIRequest | None, out: Path) -> int:
    """Plan, print the plan, make what is missing and summarise; `out` is locked by the caller."""
    sources: list[tuple[Path, str]] = []
    if cfg.backend == "folder":
        sources, errors = validate_sources(cfg.src, cfg.n)
        for err in errors:
            print(f"dallm teacher: skipping a corrupt image: {err}", file=sys.stderr)
        if not sources:
            raise ValueError(f"--src: no readable images in {cfg.src}")
        if cfg.n is not None and len(sources) < cfg.n:
            raise ValueError(f"--n {cfg.n}: --src {cfg.src} has only {len(sources)} readable images")
        n = len(sources)
    else:
        n = cfg.n
    n_train, n_val = split_counts(n, cfg.val_count, cfg.val_fraction)
    slots = wanted_slots(out, n_train, n_val)
    for directory in dict.fromkeys(s.directory for s in slots):
        directory.mkdir(exist_ok=True)

    settings, what = _settings(cfg, request)
    state = scan(out, slots, settings)
    plan = Plan(what, out, n_train, n_val, state)
    if request is not None:
        from dallm.openai_teacher import count_requests

        plan.verb = "to request"
        plan.requests = count_requests(len(state.missing), request.spec.max_per_request)
        plan.usd_per_image, plan.price_note = request.price()
    elif cfg.backend == "diffusers":
        check_seeds(state, state.missing, cfg.seed)
        plan.verb = "to generate"
    else:
        plan.verb = "to import"
    print("\n".join(plan.lines()), flush=True)
    if cfg.max_cost is not None and plan.cost > cfg.max_cost:
        raise ValueError(
            f"--max_cost {cfg.max_cost:.2f}: the plan is estimated at ${plan.cost:.2f}; nothing was requested"
        )
    if not state.missing:
        print(f"dallm teacher: all {n} images present in {out}; nothing to do")
        return 0

    made, extra_lines, fatal = 0, [], None
    if request is not None:
        from dallm.openai_teacher import run_openai

        stats = run_openai(
            request,
            state.missing,
            key=key,
            base_url=cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None,
            concurrency=cfg.concurrency,
            max_retries=cfg.max_retries,
            max_backoff=cfg.max_backoff,
            max_refusals=cfg.max_refusals,
            timeout=cfg.timeout,
            progress=cfg.progress,
        )
        made, fatal = stats.images, stats.fatal
        extra_lines = stats.summary_lines(plan.usd_per_image)
    elif cfg.backend == "diffusers":
        made = _run_diffusers(cfg, state.missing)
    else:
        made = import_folder(sources, slots, state, cfg.prompt, cfg.progress)

    final = scan(out, slots, settings)
    print(f"dallm teacher: {len(final.present)} of {n} images in {out} ({made} new)")
    for line in extra_lines:
        print(f"  {line}")
    if fatal is not None:
        raise RuntimeError(fatal)
    if final.missing:
        print(
            f"dallm teacher: {len(final.missing)} images still missing; run the same command again to make "
            "only those",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_diffusers(cfg: Any, slots: list[Slot]) -> int:
    height, width = _parse_size(cfg.size)
    print(f"dallm teacher: loading {cfg.model}", file=sys.stderr, flush=True)
    pipe = load_text2image_pipeline(cfg.model, cfg.device)
    made = 0
    for directory in dict.fromkeys(s.directory for s in slots):
        by_index = {s.index: s for s in slots if s.directory == directory}
        # One call per run of consecutive missing images, as their file names follow start_index.
        for run in consecutive_runs(sorted(by_index)):
            seeds = [by_index[i].seed(cfg.seed) for i in run]
            made += len(
                generate_with_pipeline(
                    pipe,
                    cfg.prompt,
                    directory,
                    seeds=seeds,
                    start_index=run[0],
                    num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance_scale,
                    height=height,
                    width=width,
                    batch_size=cfg.batch_size,
                    model=model_id(cfg.model),
                    negative_prompt=cfg.negative_prompt,
                    progress=cfg.progress,
                )
            )
    return made
