"""The random-weight SD v1-5 architecture used by benchmarks matches the real model's sizes."""

from __future__ import annotations

from dallm.arch import build_components
from dallm.module import DallmModule


def test_sd15_architecture_and_lora_size():
    # On the meta device: shapes only, no memory, no init time.
    parts = build_components("sd15", device="meta")
    counts = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    module = DallmModule("random:sd15", rank=4)
    module.attach_base(**parts)
    # LoRA r=4 on Q/K/V/O of all 32 attention blocks (128 linear layers) + two 768-d token rows.
    lora = [n for n, p in module.named_parameters() if p.requires_grad and "lora_A" in n]
    assert len(lora) == 128
    assert module.param_counts["trainable"] == 797_184 + 2 * 768
