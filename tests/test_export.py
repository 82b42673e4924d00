"""LoRA export formats: every file loads in diffusers and gives the run's own sample (diffusers dir, the run's
one embedding, the kohya and a1111 files), their metadata and model card, file modes, DoRA and noise offset,
and `dallm export` of an export directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same_export
from safetensors import safe_open
from safetensors.torch import load_file

from dallm.export.formats import write_exports
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


def own_sample(module, prompt=PROMPT, seed=7):
    """The run's own sample: dallm's sampler with the weights in memory (the tiny model's DDIM, as `image`)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(module.noise_scheduler.config)
    return module.generate(prompt, [seed], num_inference_steps=4, scheduler=sched, output_type="np")[0]


def test_every_file_loads_in_diffusers_and_gives_the_runs_own_sample(tiny_model_dir, tmp_path):
    # alpha != rank and a text-encoder LoRA: both must survive the kohya conversion
    module = trained_module(tiny_model_dir, rank=4, alpha=8, train_text_encoder=True)
    out = write_exports(module, tmp_path / "x", 3, ["diffusers", "kohya", "a1111"], run=RUN, history=HISTORY)
    assert {p.name for p in out.iterdir()} == {
        "pytorch_lora_weights.safetensors", "s1.safetensors", "s2.safetensors", "tiny-v0.safetensors",
        "tiny-v0-lora.safetensors", "tiny-v0-a1111.safetensors", "dallm.json", "README.md", "kid_curve.png",
    }  # fmt: skip
    trigger = "a realistic painting of a cat in baroque art style like tiny-v0"
    ours = own_sample(module)
    base = image(pipeline(tiny_model_dir), trigger)

    # the diffusers directory with one file per token, and the prompt as trained
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion([str(out / "s1.safetensors"), str(out / "s2.safetensors")])
    assert np.abs(image(pipe) - ours).max() < 1e-4
    # the same with the run's one embedding file and the one trigger word
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion(str(out / "tiny-v0.safetensors"), token="tiny-v0")
    assert np.abs(image(pipe, trigger) - ours).max() < 1e-4
    # the kohya file through diffusers' own kohya converter, with the embedding file
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(out), weight_name="tiny-v0-lora.safetensors")
    pipe.load_textual_inversion(str(out / "tiny-v0.safetensors"), token="tiny-v0")
    assert np.abs(image(pipe, trigger) - ours).max() < 1e-4
    # the a1111 file: its LoRA part (diffusers refuses keys it does not know) and its bundled embedding
    state = load_file(out / "tiny-v0-a1111.safetensors")
    pipe = pipeline(tiny_model_dir)
    pipe.load_lora_weights({k: v for k, v in state.items() if k.startswith("lora_")})
    pipe.load_textual_inversion(state["bundle_emb.tiny-v0.string_to_param.*"], token="tiny-v0")
    assert np.abs(image(pipe, trigger) - ours).max() < 1e-4
    assert np.abs(base - ours).max() > 1e-2

    with safe_open(str(out / "tiny-v0-lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "3"
    assert meta["ss_kid_val"] == "0.1" and meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_placeholder_tokens"]) == ["<s1>", "<s2>"]
    # the prompt A1111/Forge/kohya users read there works in them: the embedding's name, never "<s1><s2>"
    assert meta["ss_instance_prompt"] == trigger and meta["modelspec.trigger_phrase"] == "tiny-v0"
    for name in ("tiny-v0-lora.safetensors", "tiny-v0-a1111.safetensors"):
        blob = (out / name).read_bytes()
        header = int.from_bytes(blob[:8], "little")
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata()["sshs_model_hash"] == hashlib.sha256(blob[8 + header :]).hexdigest()

    info = json.loads((out / "dallm.json").read_text())
    assert info["step"] == 3 and info["kid/val"] == 0.1 and info["trigger"] == "tiny-v0"
    assert (
        info["kohya_file"] == "tiny-v0-lora.safetensors" and info["embedding_file"] == "tiny-v0.safetensors"
    )
    assert info["trigger_prompt"] == trigger and info["run"] == RUN and info["kid_history"] == HISTORY
    card = (out / "README.md").read_text()
    for text in (PROMPT, "kid_curve.png", f"<lora:tiny-v0-lora:1> {trigger}", "embedding:tiny-v0",
                 "`tiny-v0.safetensors` into `embeddings`", "models/embeddings", "--textual_inversion_embeddings",
                 f"<lora:tiny-v0-a1111:1> {trigger}", 'token="tiny-v0"', "Not run here"):  # fmt: skip
        assert text in card, text
    assert "<s1> <s2>" not in card


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




@pytest.mark.slow  # over a second: the full suite runs it, the fast loop stays under a minute
def test_export_of_a_lora_dir_equals_the_training_time_export(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    from dallm.cli import main
    from dallm.export.formats import copy_export

    module = trained_module(tiny_model_dir, rank=4, alpha=8, train_text_encoder=True)
    run = tmp_path / "logs" / "tiny" / "version_0"  # a run dir whose checkpoints are gone
    (run / "samples").mkdir(parents=True)
    Image.new("RGB", (64, 32), "red").save(run / "samples" / "step=000003.png")
    step3 = write_exports(module, run / "lora" / "step=000003", 3, run=RUN, history=HISTORY,
                          samples_dir=run / "samples")  # fmt: skip
    copy_export(step3, run / "lora" / "last")
    assert (step3 / "samples.png").is_file()

    def export(*args: str) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", *args])
        assert exit_info.value.code == 0, capsys.readouterr().err

    # lora/last (the directory the end-of-run summary points at) and the run dir (its lora/last here)
    export(str(run / "lora" / "last"), "--out", str(tmp_path / "again"))
    same_export(tmp_path / "again", step3)
    export(str(run))
    same_export(run / "export" / "step=000003", step3)
    # another format and another name from the same directory, no checkpoint and no base model needed
    export(str(run / "lora" / "last"), "--format", "a1111", "--name", "cats-v2", "--out", str(tmp_path / "a"))
    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} == {
        "cats-v2.safetensors", "cats-v2-a1111.safetensors", "dallm.json", "README.md", "kid_curve.png", "samples.png",
    }  # fmt: skip
    rows = load_file(out / "cats-v2.safetensors")["emb_params"]
    bundle = load_file(out / "cats-v2-a1111.safetensors")
    assert torch.equal(bundle.pop("bundle_emb.cats-v2.string_to_param.*"), rows)
    assert bundle.keys() == load_file(step3 / "tiny-v0-lora.safetensors").keys()
    assert all(torch.equal(v, load_file(step3 / "tiny-v0-lora.safetensors")[k]) for k, v in bundle.items())
    info = json.loads((out / "dallm.json").read_text())
    assert info["trigger"] == "cats-v2" and info["token_files"] == [] and info["step"] == 3
    assert (
        "<lora:cats-v2-a1111:1> a realistic painting of a cat in baroque art style like cats-v2"
        in (out / "README.md").read_text()
    )


def test_exported_files_follow_the_umask(tiny_model_dir, tmp_path):
    import os

    from dallm.cache import LatentCache
    from dallm.export.formats import copy_export

    module = trained_module(tiny_model_dir)
    old = os.umask(0o022)
    try:
        for mask, mode in ((0o022, 0o644), (0o027, 0o640)):
            os.umask(mask)
            out = write_exports(module, tmp_path / oct(mask) / "step", 1, ["diffusers", "kohya", "a1111"],
                                run=RUN, history=HISTORY)  # fmt: skip
            copy_export(out, out.parent / "last")
            LatentCache("vae", tmp_path / oct(mask) / "cache").put("k", torch.zeros(2))
            files = [p for p in (tmp_path / oct(mask)).rglob("*") if p.is_file()]
            assert len(files) > 2 * 7 and not [p for p in files if p.name.endswith(".tmp")]
            assert {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in files} == {
                p.relative_to(tmp_path): mode for p in files
            }
    finally:
        os.umask(old)


def test_saved_base_models_follow_the_umask(tmp_path):
    """A base model dallm writes (tiny, random SD v1-5 architecture, toy) is readable by another user's UI."""
    import os

    from dallm.arch.tiny import build_tiny_pipeline

    old = os.umask(0o027)
    try:
        build_tiny_pipeline(tmp_path / "tiny", seed=0, resolution=32)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert "tiny/unet/diffusion_pytorch_model.safetensors" in modes  # safetensors' save_file makes these 0600
    assert set(modes.values()) == {0o640}, modes
