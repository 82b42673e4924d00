"""The OpenAI Images API as a teacher: DALL-E 2, DALL-E 3 and gpt-image-1 through the official SDK.

Requests run in a thread pool (`--concurrency`); the main thread alone writes images and manifest
lines, so the manifest never interleaves. The SDK's own retries are switched off (`max_retries=0`):
the loop here honours `Retry-After` for every worker at once (a 429 means the *account* is rate
limited, not just that one request), counts retries for the summary, and never retries a response
that arrived but does not decode, because that one may already be billed.

What happens on each kind of failure:

| response | what the run does |
|---|---|
| 429 (rate limit), 408, 409, 5xx, dropped connection, timeout | retry with backoff, honouring Retry-After |
| 429 `insufficient_quota`, 401, 403, 404, other 4xx | stop at once (no request after it would succeed) |
| 400 `content_policy_violation` / `moderation_blocked` | refusal: recorded in the manifest, counted, retried until --max_refusals |
| 200 with malformed JSON or base64 | error naming the request id; its good images and all others are kept |
| 200 with `url` items instead of `b64_json` | each image downloaded (it is paid for), without the key |

Each image's manifest record is also inside its PNG (`dallm.teacher.openai_images.with_record`), written in the
same atomic step: a kill between the file and its manifest line costs nothing, the next run adopts it.
Nothing is paid twice except the requests in flight at a kill.

The key is given to the SDK and nothing else: it is not a flag, not recorded, and `redact` strips it
from every message that could echo it (a proxy's error body, for instance).
"""

from __future__ import annotations

import email.utils
import math
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from dallm.manifest import append_manifest, save_bytes_atomic, utc_from_unix, utc_now

# The model table and the response decoding were part of this module; their names stay importable here.
from dallm.teacher.openai_images import (  # noqa: F401
    DecodedImage,
    MalformedResponse,
    decode_response,
    url_downloader,
    with_record,
)
from dallm.teacher.openai_models import (  # noqa: F401
    MODELS,
    PRICES_DATE,
    PRICES_SOURCE,
    ImageModel,
    OpenAIRequest,
    batches,
    count_requests,
    resolve_request,
)
from dallm.teacher.slots import Slot

REFUSAL_CODES = ("content_policy_violation", "moderation_blocked")
# A 429 with this code is an empty prepaid balance or a hard limit: waiting does not help.
FATAL_429_CODES = ("insufficient_quota", "billing_hard_limit_reached")
RETRY_STATUS = (408, 409, 429)
BACKOFF_START_S = 1.0


def redact(text: str, key: str) -> str:
    """`text` with every occurrence of the API key replaced."""
    return text.replace(key, "<OPENAI_API_KEY>") if key and len(key) >= 4 else text


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` (seconds or an HTTP date); None if absent."""
    lower = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = lower.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            parsed = email.utils.parsedate_tz(value) if name == "retry-after" else None
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def backoff_seconds(attempt: int, max_backoff: float, rng: random.Random) -> float:
    """Exponential backoff (1 s, 2 s, 4 s, ... capped at max_backoff) with jitter in [50%, 100%].

    The jitter keeps workers that failed together from retrying in lockstep.
    """
    return min(max_backoff, BACKOFF_START_S * 2.0 ** min(attempt, 30)) * (0.5 + 0.5 * rng.random())




class _Gate:
    """A shared 'not before' time: one Retry-After holds back every worker, not only the one told."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def wait(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                remaining = self._until - time.monotonic()
            if remaining <= 0:
                return
            stop.wait(remaining)


@dataclass
class Outcome:
    """What one request (with its retries) came back with."""

    slots: list[Slot]
    request_id: str | None = None
    created: int | None = None
    images: list[DecodedImage | str] = field(default_factory=list)
    refusal: dict[str, Any] | None = None
    failed: str | None = None  # this request gave up; the run goes on
    fatal: str | None = None  # the run stops
    requests: int = 0
    retries: int = 0


@dataclass
class RunStats:
    """Counts for the summary of an OpenAI run."""

    images: int = 0
    requests: int = 0
    retries: int = 0
    refusals: int = 0
    failures: list[str] = field(default_factory=list)
    fatal: str | None = None
    stopped: str | None = None

    def summary_lines(self, usd_per_image: float) -> list[str]:
        lines = [
            f"requests {self.requests} ({self.retries} retries), content-policy refusals {self.refusals}, "
            f"failed requests or images {len(self.failures)}",
            f"estimated cost of the new images ${self.images * usd_per_image:.2f} "
            f"({self.images} x ${usd_per_image:.3f})",
        ]
        if self.stopped:
            lines.append(self.stopped)
        return lines


class _Fetcher:
    """Runs one request with its retries in a worker thread; touches no file."""

    def __init__(
        self,
        client: Any,
        request: OpenAIRequest,
        *,
        key: str,
        max_retries: int,
        max_backoff: float,
        stop: threading.Event,
        say: Callable[[str], None],
        timeout: float = 300.0,
    ) -> None:
        self.client, self.request, self.key = client, request, key
        self.max_retries, self.max_backoff = max_retries, max_backoff
        self.stop, self.say = stop, say
        self.gate = _Gate()
        self.rng = random.Random()
        self.download = url_downloader(timeout)

    def fetch(self, slots: list[Slot]) -> Outcome:
        import openai

        out = Outcome(slots)
        for attempt in range(self.max_retries + 1):
            self.gate.wait(self.stop)
            if self.stop.is_set():
                return out  # the run is stopping: ask for nothing more
            out.requests += 1
            try:
                raw = self.client.images.with_raw_response.generate(**self.request.params(len(slots)))
            except openai.APIStatusError as err:
                rid, status, code = err.request_id, err.status_code, err.code
                what = f"request {rid}: HTTP {status}" + (f" {code}" if code else "")
                # The server's own words when it sent OpenAI's error body, else the SDK's summary.
                said = err.body.get("message") if isinstance(err.body, dict) else None
                message = redact(" ".join(str(said or err.message).split()), self.key)[
                    :300
                ]  # a proxy's HTML page
                if status == 400 and code in REFUSAL_CODES:
                    out.request_id = rid
                    out.refusal = {"code": code, "message": message}
                    return out
                if not (status in RETRY_STATUS or status >= 500) or code in FATAL_429_CODES:
                    out.fatal = f"{what}: {message}"
                    return out
                retry_after = retry_after_seconds(err.response.headers)
            except openai.APIConnectionError as err:  # includes timeouts
                what = f"request (no response): {type(err).__name__}"
                message, retry_after, status = redact(str(err), self.key), None, None
            else:
                out.request_id = raw.headers.get("x-request-id")
                try:
                    out.created, out.images = decode_response(
                        raw.content, out.request_id, self.request.size, self.download
                    )
                except MalformedResponse as err:
                    out.failed = redact(str(err), self.key)
                return out
            if attempt == self.max_retries:
                out.failed = f"{what}: {message} (gave up after {attempt + 1} attempts, --max_retries)"
                return out
            if retry_after is not None:
                delay, why = retry_after, "Retry-After"
            else:
                delay, why = backoff_seconds(attempt, self.max_backoff, self.rng), "backoff"
            if status == 429:
                self.gate.hold(delay)
            if self.stop.is_set():
                return out
            self.say(f"{what}: retry {attempt + 1} of {self.max_retries} in {delay:.1f} s ({why})")
            out.retries += 1
            self.stop.wait(delay)  # wakes early when the run stops
        raise AssertionError("unreachable")


def run_openai(
    request: OpenAIRequest,
    slots: list[Slot],
    *,
    key: str,
    base_url: str | None,
    concurrency: int,
    max_retries: int,
    max_backoff: float,
    max_refusals: int,
    timeout: float,
    progress: bool = True,
) -> RunStats:
    """Fill `slots` from the Images API; every image is on disk with its manifest line when it returns."""
    import openai
    from tqdm.auto import tqdm

    def say(message: str) -> None:
        tqdm.write(f"dallm teacher: {redact(message, key)}", file=sys.stderr)

    client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
    stop = threading.Event()
    fetcher = _Fetcher(
        client,
        request,
        key=key,
        max_retries=max_retries,
        max_backoff=max_backoff,
        stop=stop,
        say=say,
        timeout=timeout,
    )
    stats = RunStats()
    pending = deque(batches(slots, request.spec.max_per_request))
    running: dict[Future[Outcome], list[Slot]] = {}
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="dallm-openai")
    bar = tqdm(
        total=len(slots), desc=f"openai {request.model}", unit="img", disable=not progress, file=sys.stderr
    )
    try:
        while running or (pending and not stop.is_set()):
            while pending and len(running) < concurrency and not stop.is_set():
                batch = pending.popleft()
                running[pool.submit(fetcher.fetch, batch)] = batch
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                outcome = future.result()
                stats.requests += outcome.requests
                stats.retries += outcome.retries
                stats.images += _save(request, outcome, stats, say)
                bar.update(sum(isinstance(i, DecodedImage) for i in outcome.images))
                if outcome.fatal and stats.fatal is None:
                    stats.fatal = f"stopped: {outcome.fatal}"
                    stop.set()
                if outcome.refusal is not None:
                    stats.refusals += 1
                    if stats.refusals >= max_refusals:
                        stats.stopped = (
                            f"stopped after {stats.refusals} content-policy refusals (--max_refusals)"
                        )
                        stop.set()
                    else:
                        pending.append(outcome.slots)  # refusals are not billed: ask again
    finally:
        stop.set()  # a Ctrl-C: workers ask for nothing more
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
    return stats


def _save(request: OpenAIRequest, outcome: Outcome, stats: RunStats, say: Callable[[str], None]) -> int:
    """Write the decoded images of one outcome (file with its record, then the manifest line); report the
    rest. Main thread only."""
    created = utc_from_unix(outcome.created) if outcome.created is not None else utc_now()
    common = request.settings()
    if outcome.refusal is not None:
        say(
            f"request {outcome.request_id}: refused ({outcome.refusal['code']}): {outcome.refusal['message']}"
        )
        record = {"refusal": True, **common, "n": len(outcome.slots), "request_id": outcome.request_id}
        append_manifest(outcome.slots[0].directory, {**record, **outcome.refusal, "created": utc_now()})
        return 0
    if outcome.failed:  # the fatal message ends the run as its error line instead
        say(outcome.failed)
        stats.failures.append(outcome.failed)
    saved = 0
    for slot, item in zip(
        outcome.slots, outcome.images, strict=False
    ):  # fewer images than asked: rest missing
        if isinstance(item, str):
            say(item)
            stats.failures.append(item)
            continue
        slot.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "file": slot.path.name,
            **common,
            "revised_prompt": item.revised_prompt,
            "image_size": item.size,
            "request_id": outcome.request_id,
            "created": created,
        }
        # The record travels inside the PNG, written in one atomic step with it: a kill before the manifest
        # line leaves an image the next run adopts (teacher.adopt_unrecorded) instead of paying for it again.
        sha = save_bytes_atomic(with_record(item.png, record), slot.path)
        append_manifest(slot.directory, {**record, "sha256": sha})
        saved += 1
    if outcome.images and len(outcome.images) < len(outcome.slots):
        problem = (
            f"request {outcome.request_id}: {len(outcome.images)} images returned, {len(outcome.slots)} asked"
        )
        say(problem)
        stats.failures.append(problem)
    return saved
