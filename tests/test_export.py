"""LoRA export formats: the kohya/A1111 file (keys, alpha, bundled tokens, metadata) against the diffusers
export, the model card, DoRA and noise offset, and `dallm export` of a training checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dallm.formats import write_exports
from dallm.module import DallmModule

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a realistic painting of a cat in baroque art style like <s1><s2>"
RUN = {"name": "tiny-v0", "num_train_images": 8, "num_reg_images": 4, "resolution": 32, "max_steps": 10}
HISTORY = [
    {"step": 0, "kid/val": 0.3, "kid/train": 0.25, "kid/reference": 0.01, "kid/val_floor": 0.02},
    {"step": 3, "kid/val": 0.1, "kid/val_std": 0.02, "kid/train": 0.08},
]


def trained_module(tiny_model_dir, **kw) -> DallmModule:
    """A tiny module whose trainable weights were moved far from their init (as after training)."""
    module = DallmModule(str(tiny_model_dir), instance_prompt=PROMPT, **kw)
    module.configure_model()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, prompt=PROMPT, seed=7):
    return pipe(prompt, generator=[torch.Generator().manual_seed(seed)], num_inference_steps=4,
                output_type="np").images[0]  # fmt: skip


def test_kohya_file_gives_the_diffusers_exports_image(tiny_model_dir, tmp_path):
    # alpha != rank and a text-encoder LoRA: both must survive the kohya conversion
    module = trained_module(tiny_model_dir, rank=4, alpha=8, train_text_encoder=True)
    out = write_exports(module, tmp_path / "x", 3, run=RUN, history=HISTORY)
    kohya = out / "tiny-v0.safetensors"
    assert {"pytorch_lora_weights.safetensors", "s1.safetensors", "s2.safetensors", "dallm.json",
            "README.md", "kid_curve.png", kohya.name} <= {p.name for p in out.iterdir()}  # fmt: skip
    state = load_file(kohya)
    keys = list(state)
    lora_keys = [k for k in keys if k.startswith("lora_")]
    assert set(keys) - set(lora_keys) == {
        "bundle_emb.<s1>.string_to_param.*",
        "bundle_emb.<s2>.string_to_param.*",
    }
    assert any(
        k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down")
        for k in keys
    )
    assert any(k.startswith("lora_unet_") and "_to_out_0.lora_up.weight" in k for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert all(state[k].item() == 8.0 for k in keys if k.endswith(".alpha"))
    # bundled tokens are the token files' vectors
    for t, f in (("<s1>", "s1"), ("<s2>", "s2")):
        assert torch.equal(
            state[f"bundle_emb.{t}.string_to_param.*"][0], load_file(out / f"{f}.safetensors")[t]
        )

    pipe = pipeline(tiny_model_dir)
    base = image(pipe)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion([str(out / "s1.safetensors"), str(out / "s2.safetensors")])
    ours = image(pipe)

    pipe = pipeline(tiny_model_dir)
    # diffusers' own kohya converter; it refuses keys it does not know, so the lora_* part goes in
    pipe.load_lora_weights({k: state[k] for k in lora_keys})
    pipe.load_textual_inversion(
        [state["bundle_emb.<s1>.string_to_param.*"][0], state["bundle_emb.<s2>.string_to_param.*"][0]],
        token=["<s1>", "<s2>"],
    )
    theirs = image(pipe)
    assert np.abs(theirs - ours).max() < 1e-4
    assert np.abs(base - ours).max() > 1e-2

    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "3"
    assert meta["ss_kid_val"] == "0.1" and meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_placeholder_tokens"]) == ["<s1>", "<s2>"]
    assert meta["ss_instance_prompt"] == PROMPT and meta["modelspec.trigger_phrase"] == "<s1> <s2>"
    blob = kohya.read_bytes()
    header = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header :]).hexdigest()

    info = json.loads((out / "dallm.json").read_text())
    assert info["step"] == 3 and info["kid/val"] == 0.1 and info["kohya_file"] == kohya.name
    card = (out / "README.md").read_text()
    for text in (PROMPT, "kid_curve.png", "<lora:tiny-v0:1> <s1> <s2>", "embedding:s1", "models/embeddings"):
        assert text in card, text


def test_a1111_trigger_words_match_the_bundled_embedding_names(tiny_model_dir):
    """A1111 finds an embedding where the prompt's token ids contain the ids of its name; "<s1><s2>" glued
    together tokenizes as "<", "s", "1", "><", ... and matches neither, so the card says "<s1> <s2>"."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")

    def contains(prompt, name):
        ids, sub = tok(prompt).input_ids, tok(name, add_special_tokens=False).input_ids
        return any(ids[i : i + len(sub)] == sub for i in range(len(ids)))

    assert contains("a cat <s1> <s2>", "<s1>") and contains("a cat <s1> <s2>", "<s2>")
    assert not contains("a cat <s1><s2>", "<s1>")


def test_dora_exports_load_in_diffusers_and_kohya_is_refused(tiny_model_dir, tmp_path):
    from diffusers import DDIMScheduler

    module = trained_module(tiny_model_dir, rank=2, use_dora=True)
    assert any("lora_magnitude_vector" in n for n, p in module.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="--model.use_dora"):
        write_exports(module, tmp_path / "k", 1, formats=["kohya"])
    out = write_exports(module, tmp_path / "d", 1, formats=["diffusers"])
    sched = DDIMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    ours = module.generate(PROMPT, [7], num_inference_steps=4, scheduler=sched, output_type="np")[0]
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion([str(out / "s1.safetensors"), str(out / "s2.safetensors")])
    assert np.abs(image(pipe) - ours).max() < 1e-4


def test_noise_offset_changes_only_the_noise(tiny_model_dir):
    from test_module import fake_batch

    plain = DallmModule(str(tiny_model_dir), instance_prompt=PROMPT)
    plain.configure_model()
    shifted = DallmModule(str(tiny_model_dir), instance_prompt=PROMPT, noise_offset=0.1)
    shifted.configure_model()
    shifted.load_state_dict(plain.state_dict())
    a = plain.diffusion_losses(fake_batch(), plain.step_generator(0))
    b = shifted.diffusion_losses(fake_batch(), shifted.step_generator(0))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="--model.noise_offset must be >= 0"):
        DallmModule("unused", instance_prompt=PROMPT, noise_offset=-0.1)
