"""`dallm teacher`: collect teacher images into a directory, resumably, from one of three backends.

- `openai`: DALL-E 2/3 or gpt-image-1 through the Images API (`dallm.teacher.openai`);
- `diffusers`: any diffusers text-to-image pipeline (`dallm.teacher.pipeline`, the filler that also makes the
  DataModule's prior-preservation class images);
- `folder`: images that already exist, validated and converted to RGB PNG.

The command is the typed function `teacher` (its docstring is `--help`); what differs between backends is
behind `Backend`, and everything else (lock, plan, resume, summary) is shared. The directory layout, what
counts as present and the plan are in `dallm.teacher.slots`; the manifest and atomic writes in
`dallm.manifest`. This is a command module: the library never imports it.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from dallm.errors import PARSER_KWARGS, DallmError
from dallm.images import list_images
from dallm.manifest import lock_directory, remove_stale_temp_files
from dallm.ranges import Count, NonNegativeFinite, NonNegativeInt, PositiveFinite, Seed, UnitIntervalOpenRight
from dallm.teacher.slots import (
    VAL_DIR,
    DirState,
    Plan,
    Slot,
    adopt_unrecorded,
    check_seeds,
    import_folder,
    parse_size,
    scan,
    split_counts,
    validate_sources,
    wanted_slots,
)

if TYPE_CHECKING:
    from dallm.teacher.openai import OpenAIRequest

__all__ = ["teacher", "teacher_main"]


# ------------------------------------------------------------------------------------------ backends


class Backend:
    """One way of filling teacher slots. The class attributes declare its flags, checked by `check_flags`
    before anything is touched; the methods are all that differs between backends."""

    name: ClassVar[str]
    verb: ClassVar[str]  # the plan's "to request / to generate / to import" line
    required: ClassVar[tuple[str, ...]] = ()  # flags that must be set
    own: ClassVar[tuple[str, ...]] = ()  # flags (default None) that only this backend reads
    rejects: ClassVar[tuple[str, ...]] = ()  # flags (default None) that must stay unset

    def count(self) -> int:
        """The number of images wanted, held-out ones included."""
        raise NotImplementedError

    def settings(self) -> tuple[dict[str, Any], str]:
        """The manifest fields every image of the directory must share, and a short description of the source."""
        raise NotImplementedError

    def prepare(self, plan: Plan) -> None:
        """Add what this backend knows to the plan (requests, price) and refuse a bad plan before it is printed."""

    def make(self, state: DirState, slots: list[Slot]) -> tuple[int, list[str], str | None]:
        """Make `state.missing`: (images made, summary lines, the error that stopped the run or None)."""
        raise NotImplementedError


class OpenAIBackend(Backend):
    name, verb = "openai", "to request"
    required = ("prompt", "n", "model")
    own = ("quality", "style", "base_url", "max_cost")

    def __init__(self, f: dict[str, Any]) -> None:
        from dallm.teacher.openai import resolve_request

        self.f = f
        self.request: OpenAIRequest = resolve_request(
            f["model"], f["prompt"], f["size"], f["quality"], f["style"]
        )
        self.key = os.environ.get("OPENAI_API_KEY", "")
        if not self.key.strip():
            raise ValueError(
                "OPENAI_API_KEY is not set: export it (the key is read from the environment only, so that it "
                "never lands in shell history, configs or logs); nothing was requested"
            )
        if self.key != "".join(self.key.split()) or not (self.key.isascii() and self.key.isprintable()):
            # No HTTP header carries it: the SDK would say "Connection error" and retry in vain.
            raise ValueError(
                "OPENAI_API_KEY holds whitespace (a trailing newline from `echo` or a key file?) or characters "
                "an HTTP header cannot carry: set it to the key alone; nothing was requested"
            )

    def count(self) -> int:
        return self.f["n"]

    def settings(self) -> tuple[dict[str, Any], str]:
        return self.request.settings(), f"openai {self.request.model} {self.request.size}"

    def prepare(self, plan: Plan) -> None:
        from dallm.teacher.openai import count_requests

        plan.requests = count_requests(len(plan.state.missing), self.request.spec.max_per_request)
        plan.usd_per_image, plan.price_note = self.request.price()

    def make(self, state: DirState, slots: list[Slot]) -> tuple[int, list[str], str | None]:
        from dallm.teacher.openai import run_openai

        f = self.f
        stats = run_openai(
            self.request,
            state.missing,
            key=self.key,
            base_url=f["base_url"] or os.environ.get("OPENAI_BASE_URL") or None,
            concurrency=f["concurrency"],
            max_retries=f["max_retries"],
            max_backoff=f["max_backoff"],
            max_refusals=f["max_refusals"],
            timeout=f["timeout"],
            progress=f["progress"],
        )
        return stats.images, stats.summary_lines(self.request.price()[0]), stats.fatal


class DiffusersBackend(Backend):
    name, verb = "diffusers", "to generate"
    required = ("prompt", "n", "model")
    own = ("revision", "variant")

    def __init__(self, f: dict[str, Any]) -> None:
        self.f = f
        self.height, self.width = parse_size(f["size"])

    def count(self) -> int:
        return self.f["n"]

    def settings(self) -> tuple[dict[str, Any], str]:
        from dallm.base import model_id

        f = self.f
        settings = {
            "backend": "diffusers",
            "model": model_id(f["model"]),
            "prompt": f["prompt"],
            "negative_prompt": f["negative_prompt"],
            "steps": f["steps"],
            "guidance_scale": f["guidance_scale"],
        }
        if f["size"] is not None:  # without --size the pipeline's default, recorded as the image's size
            settings["size"] = f["size"]
        return settings, f"diffusers {f['model']}, {f['steps']} steps, guidance {f['guidance_scale']}"

    def prepare(self, plan: Plan) -> None:
        check_seeds(plan.state, plan.state.missing, self.f["seed"])

    def make(self, state: DirState, slots: list[Slot]) -> tuple[int, list[str], str | None]:
        from dallm.base import load_text2image_pipeline, model_id
        from dallm.teacher.pipeline import fill_slots

        f = self.f
        print(f"dallm teacher: loading {f['model']}", file=sys.stderr, flush=True)
        pipe = load_text2image_pipeline(
            f["model"], revision=f["revision"], variant=f["variant"], device=f["device"]
        )
        made = fill_slots(
            pipe,
            state.missing,
            f["prompt"],
            f["seed"],
            num_inference_steps=f["steps"],
            guidance_scale=f["guidance_scale"],
            height=self.height,
            width=self.width,
            batch_size=f["batch_size"],
            model=model_id(f["model"]),
            negative_prompt=f["negative_prompt"],
            progress=f["progress"],
        )
        return made, [], None


class FolderBackend(Backend):
    name, verb = "folder", "to import"
    required = ("src",)
    own = ("src",)
    rejects = ("model", "size")  # images are imported as they are, at their size

    def __init__(self, f: dict[str, Any]) -> None:
        self.f = f
        self.sources: list[tuple[Path, str]] = []
        list_images(f["src"], "--src")  # a missing or empty --src fails before --out is created

    def count(self) -> int:
        f = self.f
        self.sources, errors = validate_sources(f["src"], f["n"])
        for err in errors:
            print(f"dallm teacher: skipping a corrupt image: {err}", file=sys.stderr)
        if not self.sources:
            raise ValueError(f"--src: no readable images in {f['src']}")
        if f["n"] is not None and len(self.sources) < f["n"]:
            raise ValueError(f"--n {f['n']}: --src {f['src']} has only {len(self.sources)} readable images")
        return len(self.sources)

    def settings(self) -> tuple[dict[str, Any], str]:
        return {"backend": "folder", "prompt": self.f["prompt"]}, f"folder {self.f['src']}"

    def make(self, state: DirState, slots: list[Slot]) -> tuple[int, list[str], str | None]:
        return import_folder(self.sources, slots, state, self.f["prompt"], self.f["progress"]), [], None


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (OpenAIBackend, DiffusersBackend, FolderBackend)}


def check_flags(flags: dict[str, Any]) -> None:
    """Flag combinations that are wrong whatever is on disk, from the backends' declarations.

    Ranges are in the flags' types (`dallm.ranges`), refused while parsing.
    """
    name = flags["backend"]
    backend = BACKENDS[name]
    for flag in backend.required:
        if flags[flag] is None or flags[flag] == "":
            raise ValueError(f"--{flag} is required with --backend {name}")
    for other in BACKENDS.values():
        for flag in other.own:
            if other is not backend and flag not in backend.own and flags[flag] is not None:
                raise ValueError(f"--{flag} is for --backend {other.name} only, not {name}")
    for flag in backend.rejects:
        if flags[flag] is not None:
            raise ValueError(f"--{flag} does not apply to --backend {name}")


# ------------------------------------------------------------------------------------------- command


def teacher(
    backend: Literal["openai", "diffusers", "folder"],
    out: str,
    prompt: str | None = None,
    n: Count | None = None,
    val_count: NonNegativeInt | None = None,
    val_fraction: UnitIntervalOpenRight | None = None,
    model: str | None = None,
    size: str | None = None,
    quality: str | None = None,
    style: str | None = None,
    concurrency: Count = 4,
    base_url: str | None = None,
    max_cost: NonNegativeFinite | None = None,
    max_refusals: Count = 5,
    max_retries: NonNegativeInt = 6,
    max_backoff: NonNegativeFinite = 60.0,
    timeout: PositiveFinite = 300.0,
    seed: Seed = 0,
    steps: Count = 30,
    guidance_scale: NonNegativeFinite = 7.5,
    negative_prompt: str | None = None,
    batch_size: Count = 4,
    revision: str | None = None,
    variant: str | None = None,
    device: str | None = None,
    src: str | None = None,
    progress: bool = True,
) -> int:
    """Collect teacher images into --out (OUT/000000.png ..., held-out ones in OUT/val/, each folder with a
    manifest.jsonl). Re-running the same command makes only the missing images. The OpenAI key is read
    from OPENAI_API_KEY only.

    Prints the plan (wanted, present, to make, estimated cost) before the first request, a progress bar on
    stderr, and a summary. Exit status: 0 when every wanted image is present, 1 when the run ended with
    images still missing (failed requests, too many refusals: re-run the same command), 2 on bad input, a
    refused plan (--max_cost) or an error that stops the run (401, unknown model, ...), reported on one
    line `dallm: error: ...`. DALLM_TRACEBACK=1 shows the traceback instead.

    Args:
        backend: openai: the Images API; diffusers: a diffusers text-to-image pipeline; folder: import --src.
        out: Teacher directory to fill (created if missing).
        prompt: The prompt (required for openai and diffusers).
        n: Images wanted, held-out ones included (folder: default all).
        val_count: Of --n, this many are held out in OUT/val/.
        val_fraction: Or hold out n * fraction images (rounded half up).
        model: openai: dall-e-2, dall-e-3 or gpt-image-1; diffusers: a hub id or a local pipeline directory.
        size: WxH. openai default: 512x512 (dall-e-2), 1024x1024 (dall-e-3, gpt-image-1); diffusers: the
            pipeline's default.
        quality: openai: standard|hd (dall-e-3, default standard), low|medium|high|auto (gpt-image-1,
            default auto).
        style: openai: vivid|natural (dall-e-3 only, default vivid).
        concurrency: openai: requests in flight at once.
        base_url: openai: API base URL (default: $OPENAI_BASE_URL, then api.openai.com).
        max_cost: openai: refuse plans estimated above this (USD).
        max_refusals: openai: stop after this many content-policy refusals (each is recorded in the manifest).
        max_retries: openai: retries of one request after 429, 5xx or a dropped connection.
        max_backoff: openai: cap in seconds of the exponential backoff used when the server sends no
            Retry-After.
        timeout: openai: seconds to wait for one response.
        seed: diffusers: training image i uses seed + i.
        steps: diffusers: sampling steps.
        guidance_scale: diffusers: classifier-free guidance.
        negative_prompt: diffusers: negative prompt.
        batch_size: diffusers: images per pipeline call.
        revision: diffusers: hub revision (branch, tag or commit) of --model.
        variant: diffusers: weight-file variant of --model, e.g. fp16.
        device: diffusers: cuda, cpu, ... (default: cuda if available).
        src: folder: the directory of images to import.
        progress: Show a progress bar (on stderr).

    Returns:
        0 when every wanted image is present, 1 when some are still missing.

    Raises:
        ValueError, OSError, RuntimeError: bad input, a refused plan, or an error that stopped the run.
    """
    flags = dict(locals())  # every flag by name, for the backends' declarative checks
    check_flags(flags)
    impl = BACKENDS[backend](flags)  # may refuse before anything is touched (model, size, key)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out: {out_dir} is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_directory(out_dir):  # released on return, and by the OS if the process is killed
        for d in (out_dir, out_dir / VAL_DIR):
            remove_stale_temp_files(d)
        return _fill(impl, out_dir, val_count, val_fraction, max_cost)


def _fill(
    impl: Backend, out: Path, val_count: int | None, val_fraction: float | None, max_cost: float | None
) -> int:
    """Plan, print the plan, make what is missing and summarise; `out` is locked by the caller."""
    n = impl.count()
    n_train, n_val = split_counts(n, val_count, val_fraction)
    slots = wanted_slots(out, n_train, n_val)
    for directory in dict.fromkeys(s.directory for s in slots):
        directory.mkdir(exist_ok=True)

    settings, what = impl.settings()
    state = scan(out, slots, settings)
    adopted = adopt_unrecorded(state, settings)
    if adopted:
        # Paid for by an interrupted run that died between the image and its manifest line.
        print(f"dallm teacher: adopted {len(adopted)} complete image(s) an interrupted run wrote: "
              f"{', '.join(s.label for s in adopted[:5])}", flush=True)  # fmt: skip
        state = scan(out, slots, settings)
    plan = Plan(what, out, n_train, n_val, state, verb=impl.verb)
    impl.prepare(plan)
    print("\n".join(plan.lines()), flush=True)
    if max_cost is not None and plan.cost > max_cost:
        raise ValueError(
            f"--max_cost {max_cost:.2f}: the plan is estimated at ${plan.cost:.2f}; nothing was requested"
        )
    if not state.missing:
        print(f"dallm teacher: all {n} images present in {out}; nothing to do")
        return 0

    made, extra_lines, fatal = impl.make(state, slots)
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


def teacher_parser():
    """The `dallm teacher` parser, generated from `teacher`'s signature and docstring."""
    from jsonargparse import ArgumentParser

    description = inspect.cleandoc(teacher.__doc__ or "").split("\nArgs:")[0].strip()
    parser = ArgumentParser(prog="dallm teacher", description=description, **PARSER_KWARGS)
    parser.add_function_arguments(teacher, as_group=False)
    return parser


def teacher_main(argv: list[str]) -> int:
    """`dallm teacher ...`: parse `argv`, run `teacher`, and turn its errors into one line and exit status 2."""
    cfg = teacher_parser().parse_args(argv)  # errors reach cli.main's boundary: one line (key redacted), exit 2
    try:
        return teacher(**{k: v for k, v in cfg.as_dict().items() if k != "config"})
    except RuntimeError as err:  # a run stopped by the API, or a folder locked by another run: the user's to act on
        raise DallmError(str(err)) from err
