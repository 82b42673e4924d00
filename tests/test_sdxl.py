"""SDXL as the student, end to end on a tiny SDXL built in-process (dallm.arch.sdxl): detection, time ids from
the real sizes and crops, class images and KID rounds through StableDiffusionXLPipeline, an interrupted run
resumed bit-identically, and both export formats reloaded by diffusers reproducing the run's own sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fit, trainable
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_resume_curves import Interrupted

from dallm.data.dataset import TeacherPriorDataset, collate
from dallm.sdxl import is_sdxl_model

PROMPT = "a realistic painting of a cat in baroque art style like <s1><s2>"
STEPS = 4


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    from dallm.arch.sdxl import build_tiny_sdxl

    out = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl(out, seed=0, resolution=32)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """Teacher images of several sizes and aspect ratios, so every image's time ids differ."""
    out = tmp_path_factory.mktemp("teacher_sdxl")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(48, 40), (40, 56), (64, 48), (36, 36), (40, 40), (56, 48)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(out / f"{i:06d}.png")
    return out


def sdxl_args(tmp: Path, tiny_sdxl: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "--model.pretrained_model_name_or_path", str(tiny_sdxl), "--data.teacher_dir", str(teacher),
        "--data.num_val_images", "3", "--data.center_crop", "false", "--data.random_flip", "true",
        "--kid.every_n_steps", "2", "--kid.num_samples", "3", "--kid.num_inference_steps", "2",
        "--kid.batch_size", "3", "--trainer.log_every_n_steps", "1", "--data.prior_dir", str(tmp / "prior"),
        *extra,
    ]  # fmt: skip


def test_sdxl_is_detected_from_the_models_own_config(tiny_sdxl, tiny_model_dir):
    assert is_sdxl_model(str(tiny_sdxl)) and not is_sdxl_model(str(tiny_model_dir))


def test_time_ids_follow_the_real_size_crop_and_flip(tmp_path):
    Image.new("RGB", (48, 40)).save(tmp_path / "a.png")  # 48 wide, 40 high -> resized to 38 x 32
    ds = TeacherPriorDataset([(tmp_path / "a.png", "p")], resolution=32, center_crop=False, random_flip=True)
    seen = set()
    for seed in range(40):
        ids = ds[(0, seed)]["time_ids"].tolist()
        assert ids[:2] == [40, 48] and ids[4:] == [32, 32] and ids[2] == 0 and 0 <= ids[3] <= 6
        seen.add(ids[3])
    assert seen == set(range(7))  # every crop offset of the 38-px-wide image, flipped or not
    batch = collate([ds[(0, 1)], ds[(0, 2)]])
    assert batch["time_ids"].shape == (2, 6)


def test_the_unet_sees_the_time_ids_and_both_encoders(tiny_sdxl):
    from dallm.module import DallmModule

    module = DallmModule(str(tiny_sdxl), instance_prompt=PROMPT)
    module.configure_model()
    assert module.token_embedding is not None and module.token_embedding_2 is not None
    groups = {g["name"]: g["params"] for g in module.trainable_groups()}
    assert [p.shape for p in groups["tokens"]] == [(2, 32), (2, 32)]  # rows in both encoders
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32], [64, 48, 5, 3, 32, 32]])
    with torch.no_grad():
        a = module.denoise(noisy, t, [PROMPT] * 2, ids)
        b = module.denoise(noisy, t, [PROMPT] * 2)  # default: the uncropped 32 x 32 image of both rows
        with torch.no_grad():
            module.token_embedding_2.new_embeddings.add_(1.0)
        c = module.denoise(noisy, t, [PROMPT] * 2, ids)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    assert not torch.allclose(a, c)  # the second encoder's token rows reach the UNet


# Three fits of the tiny SDXL and six pipelines: the full suite runs it, the fast loop (`-m "not slow"`) does not.
@pytest.mark.slow
def test_tiny_sdxl_trains_resumes_exactly_and_exports_for_diffusers(tmp_path, tiny_sdxl, teacher):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from dallm.export.command import module_from_checkpoint
    from dallm.resume import load_checkpoint

    straight = tmp_path / "straight"
    fit(straight, *sdxl_args(straight, tiny_sdxl, teacher), steps=STEPS, every=2)
    run = straight / "logs/run/version_0"
    prior = sorted((straight / "prior").glob("*.png"))
    assert len(prior) == 4 and json.loads((straight / "prior/manifest.jsonl").read_text().splitlines()[0])["model"]
    history = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["callbacks"]
    kid = next(v for k, v in history.items() if k.startswith("KIDCallback"))["history"]
    assert [h["step"] for h in kid] == [0, 2, 4] and all(np.isfinite(h["kid/val"]) for h in kid)

    # interrupted after step 2's checkpoint, resumed with --ckpt_path last: the same weights, bit for bit
    broken = tmp_path / "broken"
    stop = ["--trainer.callbacks+=test_resume_curves.StopAt", "--trainer.callbacks.step=3"]
    with pytest.raises(Interrupted):
        fit(broken, *sdxl_args(broken, tiny_sdxl, teacher), *stop, steps=STEPS, every=2)
    fit(broken, *sdxl_args(broken, tiny_sdxl, teacher), "--ckpt_path", "last", steps=STEPS, every=2)
    a, b = trainable(run / "checkpoints/last.ckpt"), trainable(broken / "logs/run/version_0/checkpoints/last.ckpt")
    assert a.keys() == b.keys() and any("text_encoder_2" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the run's own sample (its weights in memory, dallm's sampler) ...
    module = module_from_checkpoint(load_checkpoint(run / "checkpoints/last.ckpt", "SOURCE"))
    ddim = DDIMScheduler.from_config(module.noise_scheduler.config)
    ours = module.generate(PROMPT, [7], num_inference_steps=3, scheduler=ddim, output_type="np")[0]

    def loaded():
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def image(pipe, prompt=PROMPT):
        return pipe(prompt, generator=[torch.Generator().manual_seed(7)], num_inference_steps=3,
                    guidance_scale=7.5, output_type="np").images[0]  # fmt: skip (SDXL's default is 5)

    out = run / "lora/last"
    info = json.loads((out / "dallm.json").read_text())
    assert info["sdxl"] and info["step"] == STEPS
    trigger = info["trigger_prompt"]
    # ... equals diffusers' with the diffusers LoRA and the per-token files loaded into both encoders ...
    pipe = loaded()
    pipe.load_lora_weights(out)
    for key, enc, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        rows = [load_file(out / f)[key] for f in info["token_files"]]
        pipe.load_textual_inversion(rows, token=info["placeholder_tokens"], text_encoder=enc, tokenizer=tok)
    assert np.abs(image(pipe) - ours).max() < 1e-4
    # ... and with the kohya file (diffusers' kohya converter) and the run's one embedding (A1111's SDXL form)
    kohya = load_file(out / info["kohya_file"])
    unet_keys = {k.split(".")[0] for k in kohya if k.startswith("lora_unet_")}
    assert unet_keys and all(k.split("_")[2] in ("input", "middle", "output") for k in unet_keys)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet_keys  # kohya's SDXL numbering
    with safe_open(str(out / info["kohya_file"]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "StableDiffusionXLPipeline" in (out / "README.md").read_text()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    emb = load_file(out / info["embedding_file"])
    assert sorted(emb) == ["clip_g", "clip_l"] and emb["clip_l"].shape == emb["clip_g"].shape == (2, 32)
    pipe = loaded()
    pipe.load_lora_weights(str(out), weight_name=info["kohya_file"])
    pipe.load_textual_inversion(emb["clip_l"], token=info["trigger"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(emb["clip_g"], token=info["trigger"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    assert np.abs(image(pipe, trigger) - ours).max() < 1e-4
    assert np.abs(image(loaded(), trigger) - ours).max() > 1e-2  # the base alone differs

    # `dallm export` of the export dir: the a1111 file with the SDXL bundle, the same kohya tensors
    from dallm.export.command import export

    export(str(out), format="diffusers,kohya,a1111", out=str(tmp_path / "again"))
    bundle = load_file(tmp_path / "again" / f"{info['trigger']}-a1111.safetensors")
    assert torch.equal(bundle[f"bundle_emb.{info['trigger']}.clip_l"], emb["clip_l"])
    assert torch.equal(bundle[f"bundle_emb.{info['trigger']}.clip_g"], emb["clip_g"])
    again = load_file(tmp_path / "again" / info["kohya_file"])
    assert again.keys() == kohya.keys() and all(torch.equal(again[k], kohya[k]) for k in kohya)

    # `dallm sample` loads it the same way (both encoders) and gives the same picture with the trigger word
    from dallm.export.sample import sample

    sample(str(out), prompt=[trigger], seeds="7", steps=3, scheduler="ddim", out=str(tmp_path / "s"), device="cpu")
    got = np.asarray(Image.open(tmp_path / "s" / "p0_scale1_seed7.png"), dtype=np.float32) / 255
    assert np.abs(got - ours).max() <= 1 / 255 + 1e-6  # the PNG's rounding


@pytest.mark.slow
def test_the_sdxl_config_runs_on_a_random_sdxl_base(tmp_path):
    """configs/sdxl_baroque_cats.yaml on the published SDXL architecture with random weights (bf16), at 64 px on
    the CPU for 2 steps: training (bf16-mixed, gradient checkpointing), validation, checkpoint and export
    (BENCHMARKS.md: its cost). Without class images: the pipeline that makes them loads in fp32 on a CPU (the
    dtype rule, dallm.base), 14 GB for SDXL, more than this shared 24 GB machine spares; the tiny SDXL test
    above makes them through the same code."""
    from dallm.arch.sdxl import save_random_sdxl
    from dallm.cli import main

    root = Path(__file__).resolve().parents[1]
    base = save_random_sdxl(tmp_path / "base", torch.bfloat16)
    main([
        "fit", "--config", str(root / "configs/sdxl_baroque_cats.yaml"),
        "--model.pretrained_model_name_or_path", str(base), "--trainer.accelerator", "cpu",
        "--data.teacher_dir", str(root / "assets/tiny/teacher"), "--data.num_teacher_images", "2",
        "--data.resolution", "64", "--data.class_prompt", "null", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--checkpoint.every_n_train_steps", "2", "--kid.every_n_steps", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    out = tmp_path / "logs/sdxl_baroque_cats/version_0/lora/last"
    info = json.loads((out / "dallm.json").read_text())
    assert info["sdxl"] and info["step"] == 2 and info["unet_layers_per_block"] == 2
    kohya = load_file(out / info["kohya_file"])
    # Q/K/V/O of self- and cross-attention in SDXL's 70 transformer blocks: 560 LoRA layers, kohya's SGM names
    assert len([k for k in kohya if k.endswith("lora_down.weight")]) == 560
    assert "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k.lora_down.weight" in kohya
    assert all(torch.isfinite(v).all() for v in kohya.values())
    emb = load_file(out / info["embedding_file"])
    assert emb["clip_l"].shape == (2, 768) and emb["clip_g"].shape == (2, 1280)
