"""Tests of dallm.manifest: crash-tolerant manifest lines, atomic writes, the directory lock."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from dallm.manifest import (
    append_manifest,
    lock_directory,
    read_manifest,
    remove_stale_temp_files,
    save_png_atomic,
)


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
    with Image.open(tmp_path / "x.png") as im:  # the bytes on disk are the image, not just its hash
        assert im.format == "PNG" and im.getpixel((3, 3)) == (1, 2, 3)


def test_lock_directory_is_exclusive_and_released(tmp_path):
    with lock_directory(tmp_path):
        with pytest.raises(RuntimeError, match=r"being filled by another running process .*\.lock is locked"):
            with lock_directory(tmp_path):
                pass
    with lock_directory(tmp_path):  # released at the end of the block
        pass


def test_remove_stale_temp_files_removes_only_temp_files(tmp_path):
    save_png_atomic(Image.new("RGB", (2, 2)), tmp_path / "000000.png")
    (tmp_path / ".000001.png.abc.tmp").write_bytes(b"x")
    removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".000001.png.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.png"]
