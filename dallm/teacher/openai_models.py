"""The OpenAI Images API models dallm knows: sizes, qualities, styles, prompt limits and dated prices.

A plain table, no network: `resolve_request` checks --model/--size/--quality/--style/--prompt against it
before anything is requested, and the plan's cost estimate comes from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dallm.teacher.slots import Slot

# USD per image from https://openai.com/api/pricing, as listed on this date. gpt-image-1 is billed by
# tokens; these are OpenAI's own per-image figures for its square and portrait/landscape sizes.
PRICES_DATE = "2025-04-23"
PRICES_SOURCE = "openai.com/api/pricing"



@dataclass(frozen=True)
class ImageModel:
    """What one Images API model accepts, and its prices keyed by (quality, size)."""

    name: str
    max_per_request: int
    sizes: tuple[str, ...]
    default_size: str
    prices: Mapping[tuple[str | None, str], float]
    qualities: tuple[str, ...] = ()
    default_quality: str | None = None
    styles: tuple[str, ...] = ()
    default_style: str | None = None
    # gpt-image-1 always answers with b64_json and rejects the response_format parameter.
    sends_response_format: bool = True
    # The longest prompt the model takes, in characters (OpenAI's API reference): a longer one is refused
    # here, before paying for requests that would fail or be cut.
    max_prompt_chars: int = 1000


def _gpt_image_prices() -> dict[tuple[str | None, str], float]:
    per_quality = {"low": (0.011, 0.016), "medium": (0.042, 0.063), "high": (0.167, 0.25)}
    out: dict[tuple[str | None, str], float] = {}
    for quality, (square, oblong) in per_quality.items():
        out[(quality, "1024x1024")] = square
        out[(quality, "1536x1024")] = out[(quality, "1024x1536")] = oblong
    return out


MODELS: dict[str, ImageModel] = {
    "dall-e-2": ImageModel(
        "dall-e-2",
        max_per_request=10,
        sizes=("256x256", "512x512", "1024x1024"),
        default_size="512x512",
        prices={(None, "256x256"): 0.016, (None, "512x512"): 0.018, (None, "1024x1024"): 0.020},
        max_prompt_chars=1000,
    ),
    "dall-e-3": ImageModel(
        "dall-e-3",
        max_per_request=1,
        sizes=("1024x1024", "1792x1024", "1024x1792"),
        default_size="1024x1024",
        prices={
            ("standard", "1024x1024"): 0.040,
            ("standard", "1792x1024"): 0.080,
            ("standard", "1024x1792"): 0.080,
            ("hd", "1024x1024"): 0.080,
            ("hd", "1792x1024"): 0.120,
            ("hd", "1024x1792"): 0.120,
        },
        qualities=("standard", "hd"),
        default_quality="standard",
        styles=("vivid", "natural"),
        default_style="vivid",
        max_prompt_chars=4000,
    ),
    "gpt-image-1": ImageModel(
        "gpt-image-1",
        max_per_request=10,
        sizes=("1024x1024", "1536x1024", "1024x1536", "auto"),
        default_size="1024x1024",
        prices=_gpt_image_prices(),
        qualities=("low", "medium", "high", "auto"),
        default_quality="auto",
        sends_response_format=False,
        max_prompt_chars=32000,
    ),
}


@dataclass(frozen=True)
class OpenAIRequest:
    """One resolved image request: model, prompt and the options that model has."""

    model: str
    prompt: str
    size: str
    quality: str | None
    style: str | None

    @property
    def spec(self) -> ImageModel:
        return MODELS[self.model]

    def params(self, n: int) -> dict[str, Any]:
        """Keyword arguments of `client.images.generate` for n images."""
        params: dict[str, Any] = {"model": self.model, "prompt": self.prompt, "n": n, "size": self.size}
        if self.quality is not None:
            params["quality"] = self.quality
        if self.style is not None:
            params["style"] = self.style
        if self.spec.sends_response_format:
            params["response_format"] = "b64_json"
        return params

    def settings(self) -> dict[str, Any]:
        """The manifest fields that must be equal for images to share a directory."""
        return {
            "backend": "openai",
            "model": self.model,
            "prompt": self.prompt,
            "size": self.size,
            "quality": self.quality,
            "style": self.style,
        }

    def price(self) -> tuple[float, str]:
        """(USD per image, a note saying where the number comes from) from the dated price table."""
        prices = self.spec.prices
        matching = [
            usd
            for (quality, size), usd in prices.items()
            if self.quality in (quality, "auto") and self.size in (size, "auto")
        ]
        usd = max(matching)
        bound = "upper bound for 'auto', " if len(matching) > 1 else ""
        return usd, f"${usd:.3f}/image, {bound}OpenAI prices of {PRICES_DATE}, check {PRICES_SOURCE}"


def resolve_request(
    model: str, prompt: str, size: str | None, quality: str | None, style: str | None
) -> OpenAIRequest:
    """Validate --model/--size/--quality/--style/--prompt for the Images API and fill in each model's defaults."""
    spec = MODELS.get(model)
    if spec is None:
        raise ValueError(f"--model {model!r} is not an OpenAI image model dallm knows: {', '.join(MODELS)}")
    if len(prompt or "") > spec.max_prompt_chars:
        raise ValueError(
            f"--prompt is {len(prompt)} characters; {model} takes at most {spec.max_prompt_chars}: "
            "shorten it (nothing was requested)"
        )
    size = size or spec.default_size
    if size not in spec.sizes:
        raise ValueError(f"--size {size} is not offered by {model}: {', '.join(spec.sizes)}")
    for flag, value, allowed in (("quality", quality, spec.qualities), ("style", style, spec.styles)):
        if value is not None and not allowed:
            raise ValueError(f"--{flag} does not apply to {model}")
        if value is not None and value not in allowed:
            raise ValueError(f"--{flag} {value} is not offered by {model}: {', '.join(allowed)}")
    return OpenAIRequest(model, prompt, size, quality or spec.default_quality, style or spec.default_style)


def count_requests(images: int, per_request: int) -> int:
    """Requests needed for `images` images at up to `per_request` a request."""
    return -(-images // per_request)


def batches(slots: list[Slot], per_request: int) -> list[list[Slot]]:
    """The slots to fill, in order, cut into requests of up to `per_request` images."""
    return [slots[i : i + per_request] for i in range(0, len(slots), per_request)]

