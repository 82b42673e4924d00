"""Latent and text caches: the cached path computes exactly (bit for bit) what the uncached one does."""

from __future__ import annotations

import pytest
import torch

from dallm.arch.tiny import make_tiny_images
from dallm.cache import LatentCache, vae_identity
from dallm.data.dataset import TeacherPriorDataset, collate
from dallm.module import DallmModule

PROMPT = "a realistic painting of a cat in baroque art style like <s1><s2>"
CLASS = "a realistic painting of a cat"


def module(tiny_model_dir, **kw) -> DallmModule:
    m = DallmModule(str(tiny_model_dir), instance_prompt=PROMPT, **kw)
    m.configure_model()
    return m


def batch(tmp_path, indices, flip=True):
    paths = make_tiny_images(tmp_path / "img", 6, seed=3)
    ds = TeacherPriorDataset(
        [(p, PROMPT) for p in paths[:3]], [(p, CLASS) for p in paths[3:]], resolution=32, random_flip=flip
    )
    return collate([ds[(i, s)] for i, s in indices]), ds


def test_cached_latents_equal_uncached_for_the_same_indices(tiny_model_dir, tmp_path):
    cached, plain = module(tiny_model_dir, cache_latents=True), module(tiny_model_dir, cache_latents=False)
    # Shuffled indices with repeats and both flips: every example must get its own latent.
    b, _ = batch(tmp_path, [(2, 11), (0, 5), (1, 7), (2, 12)])
    assert len(set(b["keys"])) >= 4  # different images / flips -> different keys
    for step in range(3):  # the first call fills the cache, later ones read it
        with torch.no_grad():
            got = cached.diffusion_losses(b, cached.step_generator(step))
            want = plain.diffusion_losses(b, plain.step_generator(step))
        assert torch.equal(got, want), step
    assert cached.latent_cache.misses == len(set(b["keys"])) and cached.latent_cache.hits > 0


def test_a_cached_latent_does_not_depend_on_the_batch_it_was_first_seen_in(tiny_model_dir, tmp_path):
    # After a resume the cache fills in another order and in other batches; each latent must still be the
    # same bits (a batched convolution may sum in another order than a single image's).
    m = module(tiny_model_dir)
    b, _ = batch(tmp_path, [(0, 1), (1, 2), (3, 4), (4, 2)])
    encode = lambda x: m.vae.encode(x).latent_dist.parameters  # noqa: E731
    pixels = b["pixel_values"]
    with torch.no_grad():
        together = LatentCache("v").latent_params(b["keys"], pixels, encode)
        apart = LatentCache("v")
        apart.latent_params(b["keys"][3:], pixels[3:], encode)
        apart.latent_params(b["keys"][1:3][::-1], pixels[1:3].flip(0), encode)
        again = apart.latent_params(b["keys"], pixels, encode)
    assert torch.equal(together, again)


def test_keys_follow_content_resolution_crop_and_flip(tmp_path):
    b, ds = batch(tmp_path, [(0, 1), (0, 1)])
    assert b["keys"][0] == b["keys"][1]
    flips = {ds[(0, s)]["key"] for s in range(20)}
    assert len(flips) == 2 and {k[-1] for k in flips} == {
        "0",
        "1",
    }  # exactly the flipped and unflipped variant
    noflip, _ = batch(tmp_path, [(0, 1)], flip=False)
    assert noflip["keys"][0].endswith(":0")
    other_res = TeacherPriorDataset(ds.instance_items, resolution=24)[(0, 1)]["key"]
    assert other_res.split(":")[1] == "24" and other_res.split(":")[0] == b["keys"][0].split(":")[0]


def test_disk_cache_is_reused_and_keyed_by_vae(tiny_model_dir, tmp_path):
    first = module(tiny_model_dir, cache_dir=str(tmp_path / "cache"))
    b, _ = batch(tmp_path, [(0, 1), (1, 2)])
    with torch.no_grad():
        want = first.diffusion_losses(b, first.step_generator(0))
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(set(b["keys"]))
    second = module(tiny_model_dir, cache_dir=str(tmp_path / "cache"))
    with torch.no_grad():
        got = second.diffusion_losses(b, second.step_generator(0))
    assert second.latent_cache.misses == 0 and torch.equal(got, want)
    # Another VAE (other weights) gets another id, so it never reads these latents.
    with torch.no_grad():
        second.vae.encoder.conv_in.weight.add_(0.01)
    assert vae_identity(second.vae, str(tiny_model_dir)) != first.latent_cache.vae_id
    assert (
        LatentCache(vae_identity(second.vae, str(tiny_model_dir)), tmp_path / "cache").get(b["keys"][0])
        is None
    )


def test_text_cache_only_for_prompts_without_trainable_tokens(tiny_model_dir):
    m = module(tiny_model_dir)
    hidden = m.encode_prompts([PROMPT, CLASS, PROMPT])
    assert set(m._text_cache) == {CLASS}
    assert torch.equal(hidden[0], hidden[2])
    again = m.encode_prompts([CLASS])
    assert torch.equal(again[0], hidden[1])
    # The instance prompt still carries gradient to the token rows.
    hidden[0].sum().backward()
    assert m.token_embedding.new_embeddings.grad.abs().sum() > 0
    # With LoRA on the text encoder every prompt's states change as it trains: nothing is cached.
    trained = module(tiny_model_dir, train_text_encoder=True)
    trained.encode_prompts([CLASS])
    assert trained._text_cache == {}


@pytest.mark.slow
def test_training_with_and_without_cache_ends_equal(tmp_path):
    from helpers import fit, trainable

    # SGD, not Adam: were the two paths ever 1e-8 apart, Adam would divide it by the gradient's own scale
    # (LoRA A while B is ~0) into full-size steps; SGD keeps a difference the size it is.
    sgd = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.05"]
    fit(tmp_path, *sgd, steps=3, every=3, name="cached")
    fit(tmp_path, *sgd, "--model.cache_latents", "false", steps=3, every=3, name="plain")
    a = trainable(tmp_path / "logs/cached/version_0/checkpoints/last.ckpt")
    b = trainable(tmp_path / "logs/plain/version_0/checkpoints/last.ckpt")
    for key in a:
        assert torch.equal(a[key], b[key]), (key, (a[key] - b[key]).abs().max())
