"""The LightningModule on the tiny model: tokens, LoRA, dtypes, losses, export to diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from dallm import diffusion
from dallm.module import DallmModule
from dallm.tokens import PlaceholderEmbedding

PROMPT = "a realistic painting of a cat in baroque art style like <s1><s2>"


def make_module(tiny_model_dir, **kw) -> DallmModule:
    module = DallmModule(str(tiny_model_dir), instance_prompt=kw.pop("instance_prompt", PROMPT), **kw)
    module.configure_model()
    return module


def fake_batch(n_instance=2, n_prior=2, res=32):
    g = torch.Generator().manual_seed(0)
    n = n_instance + n_prior
    return {
        "pixel_values": torch.rand(n, 3, res, res, generator=g) * 2 - 1,
        "prompts": [PROMPT] * n_instance + ["a realistic painting of a cat"] * n_prior,
        "is_prior": torch.tensor([False] * n_instance + [True] * n_prior),
    }


def test_placeholder_tokens_are_distinct_new_ids(tiny_model_dir):
    module = make_module(tiny_model_dir)
    tok = module.tokenizer
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    s1, s2 = tok.convert_tokens_to_ids(["<s1>", "<s2>"])
    assert s2 == s1 + 1
    assert ids[-2:] == [s1, s2]
    emb = module.token_embedding
    assert isinstance(emb, PlaceholderEmbedding) and emb.first_new_id == s1
    init_id = tok.convert_tokens_to_ids("painting</w>")
    base_row = emb.base.weight[init_id]
    assert torch.equal(emb.new_embeddings[0], base_row) and torch.equal(emb.new_embeddings[1], base_row)


def test_training_changes_only_lora_and_token_rows(tiny_model_dir):
    module = make_module(tiny_model_dir, rank=2)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    table_before = module.token_embedding.base.weight.detach().clone()
    trainable_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(module.trainable_groups(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        losses = module.diffusion_losses(fake_batch(), module.step_generator(step))
        loss, _, _ = diffusion.instance_prior_loss(losses, fake_batch()["is_prior"], 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Every row of the original embedding table is bit-identical; the new rows moved.
    assert torch.equal(module.token_embedding.base.weight, table_before)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), name
    changed = [
        n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])
    ]
    assert any(n.endswith("token_embedding.new_embeddings") for n in changed)
    assert any("lora_B" in n for n in changed)
    # LoRA sits on every attention Q/K/V/O of the UNet, self- and cross-attention alike.
    lora_targets = {n.rsplit(".lora_A", 1)[0] for n, _ in module.unet.named_parameters() if ".lora_A" in n}
    attn = {
        n
        for n, _ in module.unet.named_modules()
        if n.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_out.0"))
    }
    assert attn and attn <= lora_targets


def test_token_group_has_its_own_lr(tiny_model_dir):
    module = make_module(tiny_model_dir, token_lr=0.123)
    groups = {g["name"]: g for g in torch.optim.AdamW(module.trainable_groups(), lr=1e-4).param_groups}
    assert groups["tokens"]["lr"] == 0.123 and groups["lora"]["lr"] == 1e-4
    assert groups["tokens"]["params"][0] is module.token_embedding.new_embeddings


def test_mixed_precision_stores_frozen_base_in_half(tiny_model_dir):
    module = DallmModule(str(tiny_model_dir), instance_prompt=PROMPT)
    module.trainer = Trainer(
        accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False
    )
    module.configure_model()
    for name, p in module.named_parameters():
        expected = torch.float32 if p.requires_grad else torch.bfloat16
        assert p.dtype == expected, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = module.diffusion_losses(fake_batch(), module.step_generator(0))
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()


def empty_prompt_gap(module: DallmModule) -> float:
    """Mean squared distance of the module's empty-prompt prediction from the frozen base's."""
    g = torch.Generator().manual_seed(7)
    noisy = torch.randn(4, 4, 4, 4, generator=g)  # tiny VAE: 32 px -> 4x4 latents
    t = torch.tensor([10, 300, 600, 900])
    hidden = module.encode_prompts([""] * 4)
    with torch.no_grad():
        lora_pred = module.unet(noisy, t, hidden).sample
        with module.base_only():
            base_pred = module.unet(noisy, t, hidden).sample
    return float((lora_pred - base_pred).pow(2).mean())


def train_steps(module: DallmModule, steps: int, uncond_weight: float) -> None:
    optimizer = torch.optim.AdamW(module.trainable_groups(), lr=1e-2)
    for step in range(steps):
        batch = fake_batch()
        terms = module.step_losses(batch, module.step_generator(step), uncond=uncond_weight > 0)
        loss, _, _ = diffusion.instance_prior_loss(terms["diffusion"], batch["is_prior"], 1.0)
        if "uncond" in terms:
            loss = loss + uncond_weight * terms["uncond"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_uncond_loss_starts_at_zero_and_keeps_the_empty_prompt_near_the_base(tiny_model_dir):
    held = make_module(tiny_model_dir)
    plain = held.diffusion_losses(fake_batch(), held.step_generator(0))
    terms = held.step_losses(fake_batch(), held.step_generator(0), uncond=True)
    losses, uncond = terms["diffusion"], terms["uncond"]
    # The batched pass gives the prompts' losses of the plain pass; a fresh LoRA is the identity.
    assert torch.allclose(losses, plain, rtol=1e-5, atol=1e-7)
    assert uncond.shape == (4,) and float(uncond.max()) < 1e-10
    free = make_module(tiny_model_dir)
    train_steps(free, 3, uncond_weight=0.0)
    train_steps(held, 3, uncond_weight=10.0)
    gap_free, gap_held = empty_prompt_gap(free), empty_prompt_gap(held)
    # Without the term the empty prompt drifts with the LoRA; with it, it stays near the base's.
    assert gap_free > 1e-6 and gap_held < 0.2 * gap_free, (gap_free, gap_held)
    # base_only() switched the adapters back on: the trained LoRA still changes a prompted prediction.
    hidden = held.encode_prompts([PROMPT] * 4)
    noisy, t = torch.randn(4, 4, 4, 4), torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        on = held.unet(noisy, t, hidden).sample
        with held.base_only():
            off = held.unet(noisy, t, hidden).sample
    assert float((on - off).abs().max()) > 1e-4


def test_v_prediction_target_and_prior_loss_split():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type="v_prediction")
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([1, 500, 999])
    v = diffusion.training_target(sched, latents, noise, t)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(v, a * noise - s * latents, atol=1e-6)
    per = torch.tensor([1.0, 3.0, 10.0, 20.0])
    total, inst, prior = diffusion.instance_prior_loss(per, torch.tensor([False, False, True, True]), 0.5)
    assert inst.item() == 2.0 and prior.item() == 15.0 and total.item() == 9.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "--model.rank must be >= 1"),
        ({"lora_dropout": 1.0}, "--model.lora_dropout"),
        ({"uncond_loss_weight": -0.5}, "--model.uncond_loss_weight must be >= 0"),
        ({"instance_prompt": "a cat"}, "does not contain the placeholder tokens"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    kwargs.setdefault("instance_prompt", PROMPT)
    with pytest.raises(ValueError, match=match):
        DallmModule("unused", **kwargs)


def test_bad_targets_and_tokens_fail_naming_the_flag(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--model.target_modules: 'to_qq' matches no module.*to_q"):
        make_module(tiny_model_dir, target_modules=["to_qq"])
    with pytest.raises(
        ValueError, match=r"--model.placeholder_tokens: 'cat</w>' is already in the tokenizer"
    ):
        make_module(tiny_model_dir, placeholder_tokens=["cat</w>"], instance_prompt="a cat</w>")
    with pytest.raises(ValueError, match=r"--model.initializer_token: 'xyzzy' is \d+ tokens"):
        make_module(tiny_model_dir, initializer_token="xyzzy")
    with pytest.raises(ValueError, match="--model.pretrained_model_name_or_path: cannot load"):
        make_module(tiny_model_dir / "nope")


def test_export_loads_in_diffusers_and_reproduces_the_sample(tiny_model_dir, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # alpha != rank and text-encoder LoRA: both must survive the trip through the exported files.
    module = make_module(tiny_model_dir, rank=4, alpha=8, train_text_encoder=True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    sched = DDIMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    ours = module.generate(PROMPT, [7], num_inference_steps=4, scheduler=sched, output_type="np")[0]
    out = module.export(tmp_path / "lora")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["dallm.json", "pytorch_lora_weights.safetensors", "s1.safetensors", "s2.safetensors"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def sample(prompt):
        gen = [torch.Generator().manual_seed(7)]
        return pipe(prompt, generator=gen, num_inference_steps=4, output_type="np").images[0]

    base = sample(PROMPT)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion([str(out / "s1.safetensors"), str(out / "s2.safetensors")])
    assert pipe.tokenizer.tokenize("<s1><s2>") == ["<s1>", "<s2>"]
    theirs = sample(PROMPT)
    assert np.abs(theirs - ours).max() < 1e-4
    assert np.abs(base - ours).max() > 1e-2
