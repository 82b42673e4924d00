"""An image directory against what a run wants: slots, what is present, consistency, the plan.

Layout: `--n` images, of which `--val_count` are held out, as `OUT/000000.png ...` and
`OUT/val/000000.png ...`, each directory with its own `manifest.jsonl` (`dallm.manifest`). The
DataModule trains on `OUT` and validates on `OUT/val`. A slot (directory, index) is *present* when its
file exists and the manifest's last record for it has the file's sha256; a re-run makes only the
others (after adopting an unrecorded file that carries its own record, `adopt_unrecorded`), so a killed
run costs at most the requests that were in flight. The DataModule's class-image
directory (`--data.prior_dir`) follows the same rules, with its own flags in the messages (`DirFlags`).
No network, no model here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dallm.images import list_images, load_rgb
from dallm.manifest import (
    IMAGE_EXTENSIONS,
    append_manifest,
    manifest_path,
    read_manifest,
    save_png_atomic,
    sha256_file,
    slot_name,
    utc_now,
)

VAL_DIR = "val"
# Held-out image j is made with seed `--seed + VAL_SEED_OFFSET + j`, so that no training image and no
# held-out image share a seed whatever --n and --val_count were on earlier runs.
VAL_SEED_OFFSET = 1_000_000
_SLOT_NAME = re.compile(r"\d{6}\.png")


# ---------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Slot:
    """One wanted image: `directory/{index:06d}.png`, a training image or a held-out one in val/."""

    directory: Path
    index: int
    val: bool = False

    @property
    def path(self) -> Path:
        return self.directory / slot_name(self.index)

    @property
    def label(self) -> str:
        """`000003.png` or `val/000003.png`, for messages."""
        return f"{VAL_DIR}/{self.path.name}" if self.val else self.path.name

    def seed(self, base: int) -> int:
        """The diffusers seed of this image for `--seed base`."""
        return base + (VAL_SEED_OFFSET if self.val else 0) + self.index


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """(height, width) of a `WxH` --size; (None, None) for the pipeline's default."""
    if size is None:
        return None, None
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if not m or min(int(m[1]), int(m[2])) < 8:
        raise ValueError(f"--size must be WxH, e.g. 512x512, got {size!r}")
    return int(m[2]), int(m[1])


def split_counts(n: int, val_count: int | None, val_fraction: float | None) -> tuple[int, int]:
    """(training images, held-out images) for --n with --val_count or --val_fraction."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if val_count is not None and val_fraction is not None:
        raise ValueError("--val_count and --val_fraction both set the held-out images; set only one")
    if val_fraction is not None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be in [0, 1), got {val_fraction}")
        val_count = math.floor(n * val_fraction + 0.5)  # half up: 10 x 0.25 holds out 3, not round()'s 2
    val_count = val_count or 0
    if val_count < 0:
        raise ValueError(f"--val_count must be >= 0, got {val_count}")
    if val_count >= n:
        raise ValueError(f"--val_count {val_count} leaves no training images of --n {n}")
    return n - val_count, val_count


def wanted_slots(out: Path, n_train: int, n_val: int) -> list[Slot]:
    """Training slots `out/000000.png ...` first, then held-out slots `out/val/000000.png ...`."""
    return [Slot(out, i) for i in range(n_train)] + [Slot(out / VAL_DIR, j, True) for j in range(n_val)]


@dataclass(frozen=True)
class DirFlags:
    """How messages about one kind of image directory name what the user can change.

    `dallm teacher` fills `--out`; the DataModule fills `--data.prior_dir` with class images. Both share
    one notion of present (file + sha256 + settings); only the flags in the messages differ.
    """

    directory: str  # the flag of the directory: "--out"
    settings: dict[str, str]  # manifest key -> flag that sets it; unlisted keys are "--KEY"
    remedy: str  # what to do about images made with other settings
    exclusive: bool = True  # training reads the whole directory, so images dallm did not write are refused

    def of(self, key: str) -> str:
        return self.settings.get(key, f"--{key}")


TEACHER_FLAGS = DirFlags(
    "--out",
    {},
    "use another --out, or the same settings to add to it (mixed images would go unnoticed in training)",
)


def check_settings(
    directory: Path, records: list[dict[str, Any]], settings: dict[str, Any], flags: DirFlags = TEACHER_FLAGS
) -> None:
    """Refuse to add images made with other settings (prompt, model, size, ...) to `directory`.

    A record without one of the keys does not constrain it: older records may lack a field.
    """
    for no, record in enumerate(records, start=1):
        for key, want in settings.items():
            if key in record and record[key] != want:
                raise ValueError(
                    f"{flags.directory}: {directory} holds images made with {key} {record[key]!r} (record {no} "
                    f"of {manifest_path(directory)}), but this run asks for {flags.of(key)} {want!r}: "
                    f"{flags.remedy}"
                )


@dataclass
class DirState:
    """What a teacher directory already holds, against the wanted slots."""

    present: list[Slot] = field(default_factory=list)
    missing: list[Slot] = field(default_factory=list)
    unrecorded: list[Slot] = field(default_factory=list)  # files without a record: a kill's leftovers
    extra: list[str] = field(default_factory=list)  # images beyond the wanted ones (kept)
    records: dict[Path, dict[str, dict[str, Any]]] = field(default_factory=dict)  # dir -> file -> record


def scan(out: Path, slots: list[Slot], settings: dict[str, Any], flags: DirFlags = TEACHER_FLAGS) -> DirState:
    """Read the manifests of `out` and `out/val`, check them against `settings` and the files on disk.

    `flags` names the directory's flags in errors (`--out` of `dallm teacher` by default).

    Raises:
        ValueError: for other settings, a file that no longer matches its sha256 (edited, or half of an
            interrupted re-make: delete it to have it made again), or images dallm did not write.
    """
    state = DirState()
    wanted = {(s.directory, s.path.name) for s in slots}
    for directory in (out, out / VAL_DIR):
        if not directory.is_dir():
            continue
        records = read_manifest(directory)
        check_settings(directory, records, settings, flags)
        by_file = {str(r["file"]): r for r in records if r.get("file")}  # the last record describes it
        state.records[directory] = by_file
        images = [
            p
            for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        foreign = [p.name for p in images if p.name not in by_file and not _SLOT_NAME.fullmatch(p.name)]
        if foreign and flags.exclusive:
            raise ValueError(
                f"{flags.directory}: {directory} holds images that dallm did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): use an empty {flags.directory}"
            )
        for p in images:
            record = by_file.get(p.name)
            if record is not None and record.get("sha256") != sha256_file(p):
                raise ValueError(
                    f"{flags.directory}: {p} does not match its sha256 in {manifest_path(directory)} (edited after it was "
                    "written, or left by an interrupted re-make): delete the file to have it made again"
                )
            if (directory, p.name) not in wanted:
                state.extra.append(str(p.relative_to(out)))
    for slot in slots:
        if slot.path.name in state.records.get(slot.directory, {}) and slot.path.is_file():
            state.present.append(slot)
        else:
            state.missing.append(slot)
            if slot.path.is_file():
                state.unrecorded.append(slot)
    return state


def check_seeds(state: DirState, to_make: list[Slot], base: int) -> None:
    """Refuse a --seed whose seeds were already used by other images of the directory (duplicates)."""
    used = {
        r["seed"]: (d, name)
        for d, by_file in state.records.items()
        for name, r in by_file.items()
        if "seed" in r
    }
    for slot in to_make:
        owner = used.get(slot.seed(base))
        if owner is not None and owner != (slot.directory, slot.path.name):
            raise ValueError(
                f"--seed {base}: {slot.label} would get seed {slot.seed(base)}, which {owner[0] / owner[1]} "
                "already has (it would be the same image): use the --seed of the earlier runs"
            )


# ------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """What a run will do, printed before the first request."""

    what: str  # "openai dall-e-2 512x512"
    out: Path
    n_train: int
    n_val: int
    state: DirState
    verb: str = "to make"
    requests: int | None = None
    usd_per_image: float = 0.0
    price_note: str = ""

    @property
    def cost(self) -> float:
        return len(self.state.missing) * self.usd_per_image

    def lines(self) -> list[str]:
        held = f" + {self.n_val} held out in {self.out / VAL_DIR}" if self.n_val else ""
        out = [
            f"dallm teacher: plan for {self.out} ({self.what})",
            f"  images wanted   {self.n_train + self.n_val} ({self.n_train} in {self.out}{held})",
            f"  present         {len(self.state.present)}",
        ]
        todo = f"  {self.verb:<15} {len(self.state.missing)}"
        if self.requests is not None and self.state.missing:
            todo += f" in {self.requests} request{'s' * (self.requests != 1)}"
        out.append(todo)
        if self.state.unrecorded:
            out.append(
                f"  replacing       {len(self.state.unrecorded)} file(s) without a manifest record "
                f"(left by an interrupted run): {', '.join(s.label for s in self.state.unrecorded[:5])}"
            )
        if self.state.extra:
            out.append(f"  kept            {len(self.state.extra)} image(s) beyond the wanted ones")
        if self.usd_per_image:
            out.append(f"  estimated cost  ${self.cost:.2f} ({self.price_note})")
        return out


# ------------------------------------------------------------------------- adoption and the folder backend


def adopt_unrecorded(state: DirState, settings: dict[str, Any]) -> list[Slot]:
    """Give a manifest line to each slot file that has none but carries its own record, made with `settings`.

    A kill between an image's atomic write and its manifest line leaves a whole, paid image without a
    line; its record is inside the PNG (`dallm.teacher.openai_images.with_record`). Adopting it (rather than
    making it again) means nothing is paid twice. Returns the adopted slots; the caller scans again.
    """
    from dallm.teacher.openai_images import embedded_record

    adopted = []
    for slot in state.unrecorded:
        record = embedded_record(slot.path)
        if record is None or record.get("file") != slot.path.name:
            continue
        if any(record.get(key) != want for key, want in settings.items()):
            continue  # made with other settings: made again, as any unrecorded file
        append_manifest(slot.directory, {**record, "sha256": sha256_file(slot.path), "adopted": utc_now()})
        adopted.append(slot)
    return adopted



def validate_sources(src: str, n: int | None) -> tuple[list[tuple[Path, str]], list[str]]:
    """The first `n` (all if None) readable images of `src` by name, with their sha256; and the errors.

    A corrupt or unreadable file is reported and skipped, not fatal: one broken download should not
    block importing the others.
    """
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
