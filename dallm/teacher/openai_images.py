"""An Images API response as stored images: b64_json or url items decoded to PNG, sizes checked, and the
manifest record embedded in the PNG itself, so that the image file and its record are one atomic write.

A kill between an image's file and its manifest line used to leave a paid image that the next run asked
for again; the record inside the PNG (a tEXt chunk `dallm`) lets the next run adopt it instead
(`embedded_record`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image


class MalformedResponse(ValueError):
    """A 200 response whose body is not the Images API's JSON."""


@dataclass
class DecodedImage:
    """One image of a response: PNG bytes as they will be stored, and what the API said about it."""

    png: bytes
    size: str
    revised_prompt: str | None


def _decode_item(item: Any, download: Callable[[str], bytes] | None = None) -> DecodedImage:
    if isinstance(item, dict) and isinstance(item.get("url"), str) and not isinstance(item.get("b64_json"), str):
        # A `url` answer (a proxy, or a server ignoring response_format): the image is paid for, fetch it.
        if download is None:
            raise ValueError("an url instead of b64_json, and no way to download it")
        raw = download(item["url"])
    elif not isinstance(item, dict) or not isinstance(item.get("b64_json"), str):
        raise ValueError("no b64_json or url field")
    else:
        try:
            raw = base64.b64decode(item["b64_json"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"invalid base64 ({err})") from err
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            fmt, size = im.format, f"{im.width}x{im.height}"
            if fmt != "PNG":  # e.g. a proxy answering JPEG: store PNG like every other image
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                raw = buf.getvalue()
    except Exception as err:  # PIL raises many types for garbage bytes
        raise ValueError(f"base64 decodes to no image ({err})") from err
    revised = item.get("revised_prompt")
    return DecodedImage(raw, size, revised if isinstance(revised, str) else None)


def decode_response(
    body: bytes,
    request_id: str | None,
    expected_size: str | None = None,
    download: Callable[[str], bytes] | None = None,
) -> tuple[int | None, list[DecodedImage | str]]:
    """(created, one DecodedImage or an error message per returned image) of an Images API body.

    An image whose size is not `expected_size` ("WxH"; None or "auto": any) is malformed like a broken
    one: a 32x32 answer to a 512x512 request would train at another resolution without a word. An item
    with a `url` instead of `b64_json` is fetched with `download(url)` (which raises ValueError on failure).

    Raises:
        MalformedResponse: naming the request id, when the body is not JSON with a "data" list.
    """
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise MalformedResponse(f"request {request_id}: malformed response, not JSON ({err})") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise MalformedResponse(f"request {request_id}: malformed response, no 'data' list")
    created = payload.get("created")
    items: list[DecodedImage | str] = []
    for k, item in enumerate(payload["data"]):
        try:
            decoded = _decode_item(item, download)
            if expected_size not in (None, "auto") and decoded.size != expected_size:
                raise ValueError(f"it is {decoded.size}, not the requested {expected_size}")
            items.append(decoded)
        except ValueError as err:
            items.append(f"request {request_id}: image {k} of the response is malformed: {err}")
    return (int(created) if isinstance(created, int | float) else None), items


# ----------------------------------------------------------------------------------------- runner


def url_downloader(timeout: float, attempts: int = 3) -> Callable[[str], bytes]:
    """`download(url) -> bytes` for `url` items: a plain GET (the API key is never sent), a few tries.

    The URL itself is a signed link (valid about an hour): messages name its host only.
    """
    import time
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    def download(url: str) -> bytes:
        host = urlsplit(url).netloc or "?"
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"its url is not http(s) (host {host})")
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked)
                    return response.read()
            except (urllib.error.URLError, OSError) as err:
                if attempt == attempts - 1:
                    raise ValueError(f"its url (host {host}) could not be downloaded: {type(err).__name__}") from err
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    return download


# ------------------------------------------------------------------------- the record inside the PNG

RECORD_KEY = "dallm"  # keyword of the PNG tEXt chunk that holds the image's manifest record


def with_record(png: bytes, record: dict[str, Any]) -> bytes:
    """`png` with `record` (JSON, ASCII) in a tEXt chunk before IEND; the pixel data is untouched."""
    data = RECORD_KEY.encode("latin-1") + b"\0" + json.dumps(record, ensure_ascii=True).encode("ascii")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    end = len(png) - 12  # the last chunk: length 0, "IEND", its CRC
    if end < 8 or png[end + 4 : end + 8] != b"IEND":
        raise ValueError("not a PNG ending in IEND")
    return png[:end] + chunk + png[end:]


def embedded_record(path: str | Path) -> dict[str, Any] | None:
    """The manifest record inside a PNG written by `with_record` (None: no record, or not a whole image)."""
    try:
        with Image.open(path) as im:
            im.load()  # a whole image: the atomic write guarantees it, this checks it
            text = getattr(im, "text", {}).get(RECORD_KEY)
    except Exception:
        return None
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
