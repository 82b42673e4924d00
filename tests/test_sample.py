"""`dallm sample`: what a diffusers user gets equals what dallm's training-time sampler made."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import PROMPT, pipeline, trained_module

from dallm.cli import main
from dallm.export.formats import write_exports
from dallm.export.sample import make_scheduler, parse_seeds, resolve_lora_dir

PLAIN = "a painting of a cat"  # no placeholder tokens: with the LoRA off it is the base model's prompt


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def as_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.int16)


def test_parse_seeds():
    assert parse_seeds("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_seeds("5") == [5] and parse_seeds([2, 1]) == [2, 1]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("3-1")


@pytest.mark.slow  # over a second: the full suite runs it, the fast loop stays under a minute
def test_sample_reproduces_the_training_sampler_and_compares_with_the_base(tiny_model_dir, tmp_path, capsys):
    # Same batches as the sampler's (3 seeds): this strongly perturbed tiny model turns the last-bit
    # differences of another batch shape (measured: seed 2 alone vs in a batch of 3, 0.11 max abs) into
    # visible ones.
    module = trained_module(tiny_model_dir, rank=4, alpha=8, train_text_encoder=True)
    lora_dir = write_exports(
        module, tmp_path / "run" / "lora" / "last", 5, run={"name": "t", "resolution": 32}
    )
    # what the KID rounds do: DPM-Solver++ from the base's scheduler config, batched fixed seeds
    sched = make_scheduler("dpm++", module.noise_scheduler.config)
    ours = module.generate(
        PROMPT, [0, 1, 2], num_inference_steps=4, resolution=32, scheduler=sched, output_type="np"
    )

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--lora", str(tmp_path / "run"), "--prompt", PROMPT, "--prompt", PLAIN, "--prompt",
              PROMPT.replace("<s1><s2>", "t-v0"), "--seeds", "0-2",
              "--steps", "4", "--lora_scale", "[1, 0]", "--compare", "--batch_size", "3", "--out", str(out)])  # fmt: skip
    assert exit_info.value.code == 0
    assert resolve_lora_dir(tmp_path / "run") == lora_dir
    for s in range(3):
        # the same image as at training time, up to PNG rounding
        assert np.abs(png(out / f"p0_scale1_seed{s}.png") - as_uint8(ours[s])).max() <= 1
        # scale 0 switches the LoRA off: the base model's image for a prompt without the tokens
        assert np.abs(png(out / f"p1_scale0_seed{s}.png") - png(out / f"p1_base_seed{s}.png")).max() <= 1
        assert np.abs(png(out / f"p0_scale1_seed{s}.png") - png(out / f"p0_base_seed{s}.png")).max() > 10
        # the run's one trigger word (the embedding file t-v0.safetensors) stands for <s1><s2>
        assert np.array_equal(png(out / f"p2_scale1_seed{s}.png"), png(out / f"p0_scale1_seed{s}.png"))
    # --compare is the plain base pipeline
    pipe = pipeline(tiny_model_dir)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    base = pipe([PLAIN] * 3, generator=[torch.Generator().manual_seed(s) for s in range(3)], num_inference_steps=4,
                height=32, width=32, output_type="np").images  # fmt: skip
    for s in range(3):
        assert np.abs(png(out / f"p1_base_seed{s}.png") - as_uint8(base[s])).max() <= 1
    grid = Image.open(out / "grid.png")
    assert grid.height == 14 + 32 * 9 and grid.width > 32 * 3  # 3 prompts x (2 scales + base), 3 seeds
    assert json.loads((out / "samples.json").read_text())["step"] == 5


def test_sample_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--lora", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "dallm: error: --lora" in capsys.readouterr().err


def test_grid_labels_stay_apart_at_small_image_sizes():
    from PIL import ImageDraw

    from dallm.export.sample import label_grid

    tiles = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    columns = ["seed 101", "seed 102", "seed 103"]
    grid = np.asarray(label_grid([("p0 scale 1", tiles), ("p0 base", tiles)], columns).convert("L"))
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(columns[0])  # one label, as drawn
    assert width > 32  # the labels are wider than the images: side by side they would overlap
    inked = np.flatnonzero((grid[:14] < 128).any(axis=0))  # columns with label ink in the top band
    # three labels of this width drawn side by side without overlapping span at least 3 widths
    assert inked.max() - inked.min() + 1 >= 3 * width
    assert grid.shape[0] == 14 + 2 * 32
