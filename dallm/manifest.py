"""Image directories on disk: the manifest and crash-safe image writes.

A teacher (or prior) directory holds PNGs named `000000.png, 000001.png, ...` plus `manifest.jsonl`, one
JSON record per image (file, sha256, backend, model, prompt, seed, ...). Images are written atomically
and each manifest line only after its image is on disk, so a crash leaves at most a truncated last
manifest line (skipped with a warning) or an image without a line (made again by the caller). A file
name may appear in several records (an image deleted and made again): the last record is the one that
describes the file. Records without "file" (e.g. a refused request) describe no image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST_NAME = "manifest.jsonl"


def manifest_path(directory: str | Path) -> Path:
    """The manifest file of an image directory."""
    return Path(directory) / MANIFEST_NAME


def _parse_line(raw: bytes) -> dict[str, Any]:
    record = json.loads(raw.decode("utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def read_manifest(directory: str | Path) -> list[dict[str, Any]]:
    """Read `directory/manifest.jsonl` (a missing file is an empty manifest).

    An unreadable *last* line is what a crash in the middle of `append_manifest` leaves behind: it is
    skipped with a warning. An unreadable line before the last one means the file was edited or
    corrupted, and guessing would silently drop images, so it raises `ValueError` naming file and line.
    """
    path = manifest_path(directory)
    if not path.exists():
        return []
    # Split bytes, not text: a crash can cut a multi-byte UTF-8 character in the last line.
    lines = [(no, raw) for no, raw in enumerate(path.read_bytes().split(b"\n"), start=1) if raw.strip()]
    records = []
    for k, (no, raw) in enumerate(lines):
        try:
            records.append(_parse_line(raw))
        except (UnicodeDecodeError, ValueError) as err:
            if k == len(lines) - 1:
                warnings.warn(
                    f"{path}:{no}: skipping truncated or invalid last line ({err}); "
                    "probably left by an interrupted write",
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}:{no}: invalid manifest line: {err}") from err
    return records


def _drop_partial_tail(path: Path) -> None:
    """Cut an unterminated last line that is not valid JSON, so the next append starts a clean line.

    Without this, the next record would be glued to the fragment and become a bad line in the middle.
    """
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    head, _, tail = data.rpartition(b"\n")
    try:
        _parse_line(tail)
    except (UnicodeDecodeError, ValueError):
        with open(path, "r+b") as fh:
            fh.truncate(len(head) + 1 if head or data.startswith(b"\n") else 0)
        return
    with open(path, "ab") as fh:  # a complete record that only lacks its newline: keep it
        fh.write(b"\n")


def append_manifest(directory: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line and fsync it, so it survives a crash right after this call."""
    path = manifest_path(directory)
    if path.exists():
        _drop_partial_tail(path)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        if err.filename is None:
            raise with_path(err, path) from err
        raise


def with_path(err: OSError, path: Path) -> OSError:
    """`err` naming the file it was writing: a full disk says only "[Errno 28] No space left on device"."""
    if not isinstance(err, OSError) or err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror, str(path))


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable before the manifest line that points at the file is written.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read by setting and restoring it: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_bytes_atomic(
    data: bytes, path: str | Path, write: Callable[[BinaryIO, bytes], None] | None = None
) -> str:
    """Write `data` to `path` via a temp file + `os.replace`; return the sha256 of the bytes.

    Readers therefore see either no file or the complete file, never a half-written one. A kill during
    the write leaves a hidden `.NAME.*.tmp` file, which `remove_stale_temp_files` clears. `write(fh, data)`
    replaces the plain `fh.write(data)` (the checkpoint writer's kill-test hook uses it).
    """
    path = Path(path)
    # Temp file in the same directory: os.replace is only atomic within one file system.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() would respect the umask
        with os.fdopen(fd, "wb") as fh:
            if write is None:
                fh.write(data)
            else:
                write(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            raise with_path(err, path) from err
        raise
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` as a safetensors file with `save_bytes_atomic`: atomic, and its mode follows the umask.

    safetensors' own `save_file` leaves 0600 files, which a UI running as another user cannot read; every
    safetensors file dallm writes goes through here instead.
    """
    from safetensors.torch import save

    save_bytes_atomic(save(tensors, metadata), path)
    return Path(path)


def save_pretrained(model, out_dir: str | Path) -> Path:
    """`model.save_pretrained(out_dir)` as safetensors, with every file's mode following the umask.

    diffusers and transformers write their weights with safetensors' `save_file`, which leaves 0600 files
    that a UI or trainer running as another user cannot read (their JSON files already follow the umask).
    """
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    mode = 0o666 & ~current_umask()
    for path in out_dir.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)
    return out_dir


def save_png_atomic(image: Image.Image, path: str | Path) -> str:
    """Encode `image` as PNG and write it with `save_bytes_atomic`; return the sha256 of the PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return save_bytes_atomic(buf.getvalue(), path)


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the `.NAME.*.tmp` files that a killed `save_bytes_atomic` left in `directory`.

    Only call this while no other process writes into `directory` (see `lock_directory`).
    """
    d = Path(directory)
    stale = [p for p in d.glob(".*.tmp") if p.is_file()] if d.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextmanager
def lock_directory(directory: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `directory/.lock` for the `with` block (`filelock`).

    Two runs filling the same directory would request the same missing images twice and interleave
    manifest lines. The lock is an OS lock (flock on POSIX, msvcrt on Windows): it is released when the
    process dies, even by SIGKILL, so no stale lock survives a crash. `wait`: when another process holds
    it, say so and wait for it (runs of a sweep sharing class images), instead of refusing.

    Raises:
        RuntimeError: if another process holds the lock and `wait` is false (the user should know).
    """
    from filelock import FileLock, Timeout

    path = Path(directory) / ".lock"
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout as err:
        if not wait:
            raise RuntimeError(
                f"{directory} is being filled by another running process ({path} is locked)"
            ) from err
        print(f"dallm: {directory} is being filled by another process; waiting for it ({path})", flush=True)
        lock.acquire(timeout=-1)  # released when that process ends, however it ends
    try:
        yield
    finally:
        lock.release()


def slot_name(index: int) -> str:
    """File name of image `index` of a directory: `000042.png`."""
    return f"{index:06d}.png"


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string, the format of the manifest's "created"."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def utc_from_unix(seconds: float) -> str:
    """A Unix timestamp (as the OpenAI API's "created") as an ISO-8601 UTC string."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
