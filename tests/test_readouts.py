"""The readouts a person would agree with (dallm.measure.readouts) and the base-prediction term (--model.hold_weight).

The toy heads are checked against image sets made by hand with the toy world's own renderers and the
shipped teacher images; the paired drift and the hold term against a LoRA that is zero and one that is not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_module import PROMPT, fake_batch, make_module

from dallm.measure import readouts
from dallm.measure.kid import build_feature_extractor, features_of_paths
from dallm.step import held_prompts
from dallm.toy import world

ROOT = Path(__file__).resolve().parents[1]
CLASS = "a realistic painting of a cat"


def to_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])


@pytest.fixture(scope="module")
def toy():
    extractor = build_feature_extractor("toy")
    return extractor, extractor.net


def rendered(render, shape: str, n: int = 24, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    colours = list(world.COLOURS)
    return to_tensor([render(shape, colours[i % len(colours)], rng) for i in range(n)])


def test_teacher_images_read_as_teacher_world_circles(toy):
    extractor, net = toy
    paths = sorted((ROOT / "dallm/toy/assets/teacher").glob("*.png"))
    feats = features_of_paths(paths, extractor)
    base_colours = readouts.colour_histogram(net, extractor(rendered(world.render_base, "circle")))
    out = readouts.toy_shares(net, feats, base_colours, "instance")
    assert out["toy/instance_teacher_world"] >= 0.95 and out["toy/instance_circle"] >= 0.95, out
    assert 0.0 <= out["toy/instance_colour_tv"] <= 1.0


def test_the_base_models_own_class_images_read_as_base_world_circles(toy, tmp_path):
    # The class images a toy run makes (the data module's own generation, as configs/toy.yaml sets it):
    # the reference the class-prompt readouts are judged against must itself read as the base's circles.
    from dallm.data.datamodule import DallmDataModule

    dm = DallmDataModule(
        teacher_dir=str(ROOT / "dallm/toy/assets/teacher"), num_teacher_images=20,
        instance_prompt="a painting of a circle <s1><s2>", class_prompt="a painting of a circle",
        prior_dir=str(tmp_path / "prior"), num_prior_images=20, prior_generation_steps=15,
        prior_guidance_scale=5.0, prior_batch_size=20, resolution=32,
        pretrained_model_name_or_path=str(ROOT / "dallm/toy/assets/base"),
    )  # fmt: skip
    dm.prepare_data()
    extractor, net = toy
    paths = sorted((tmp_path / "prior").glob("*.png"))
    assert len(paths) == 20
    out = readouts.toy_shares(net, features_of_paths(paths, extractor), None, "class")
    assert out["toy/class_teacher_world"] <= 0.05 and out["toy/class_circle"] >= 0.95, out


def test_base_world_circles_read_as_base_world_and_squares_as_no_circles(toy):
    extractor, net = toy
    circles = extractor(rendered(world.render_base, "circle"))
    base_colours = readouts.colour_histogram(net, circles)
    out = readouts.toy_shares(net, circles, base_colours, "class")
    # The same set against its own histogram: colour distance 0.
    assert out == {"toy/class_teacher_world": 0.0, "toy/class_circle": 1.0, "toy/class_colour_tv": 0.0}
    squares = readouts.toy_shares(
        net, extractor(rendered(world.render_base, "square", seed=1)), base_colours, "c"
    )
    assert squares["toy/c_circle"] <= 0.05 and squares["toy/c_teacher_world"] <= 0.05
    # Baroque squares: the teacher's world, not circles; a readout that only looked at style would miss it.
    baroque = readouts.toy_shares(net, extractor(rendered(world.render_baroque, "square", seed=2)), None, "b")
    assert baroque == {"toy/b_teacher_world": 1.0, "toy/b_circle": 0.0}


def test_one_colour_reads_far_from_a_mix_of_four(toy):
    extractor, net = toy
    rng = np.random.default_rng(3)
    red = extractor(to_tensor([world.render_base("circle", "red", rng) for _ in range(12)]))
    mix = readouts.colour_histogram(net, extractor(rendered(world.render_base, "circle")))  # 6 of each colour
    assert readouts.toy_shares(net, red, mix, "x")["toy/x_colour_tv"] == pytest.approx(0.75)


def test_total_variation_and_histogram():
    assert readouts.total_variation(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])) == 0.0
    assert readouts.total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 1.0
    hist = readouts.histogram(torch.tensor([0, 0, 2, 3]), 4)
    assert hist.tolist() == [0.5, 0.0, 0.25, 0.25]


def test_summary_line_names_every_readout():
    entry = {"toy/instance_teacher_world": 0.95, "toy/instance_circle": 0.9, "toy/instance_colour_tv": 0.25,
             "toy/class_teacher_world": 0.0, "toy/class_circle": 1.0, "toy/class_colour_tv": 0.1,
             "kid/prior": 0.001, "drift/class": 0.002}  # fmt: skip
    line = readouts.summary_line(entry)
    assert "instance: 95% teacher world, 90% circles, colour TV 0.25" in line
    assert "class: 0% teacher world, 100% circles" in line and "drift/class 0.002" in line
    assert readouts.summary_line({"kid/val": 0.01}) is None


def fixture_for(module) -> tuple[torch.Tensor, ...]:
    latents = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))  # tiny VAE: 4x4 latents
    return readouts.drift_fixture(latents, module.noise_scheduler.config.num_train_timesteps, seed=5)


def bump_lora(module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_drift_is_zero_for_a_zero_lora_and_grows_with_it(tiny_model_dir):
    module = make_module(tiny_model_dir)
    fixture, base = fixture_for(module), {}
    timesteps = fixture[1]
    assert timesteps.tolist() == sorted(set(timesteps.tolist())) and 0 < timesteps[0] < timesteps[-1] < 1000
    prompts = [CLASS, "a photo of a dog"]
    zero, zero_guided = readouts.paired_drift(module, fixture, base, prompts, guidance=5.0)
    assert zero == zero_guided == {CLASS: 0.0, "a photo of a dog": 0.0}
    assert set(base) == {*prompts, ""} and module.training  # the base's predictions cached; mode put back
    bump_lora(module)
    moved, guided = readouts.paired_drift(module, fixture, base, prompts, guidance=5.0)
    assert all(v > 1e-8 for v in moved.values()), moved
    assert readouts.drift_metrics(moved, guided, CLASS) == {
        "drift/class": moved[CLASS],
        "drift/other": moved["a photo of a dog"],
        "drift/class_guided": guided[CLASS],
        "drift/other_guided": guided["a photo of a dog"],
    }
    # At guidance 1 the guided drift is the plain one, and none is reported; the cache changes nothing.
    assert readouts.paired_drift(module, fixture, {}, prompts) == (moved, {})
    assert module._text_cache == {}  # readouts never fill the training's prompt cache


def test_guided_drift_counts_a_prompt_and_the_empty_prompt_moving_apart(tiny_model_dir):
    """Moving the class and the empty prompt's predictions together changes the guided drift far less than
    the same plain drift in the class prompt alone (guidance multiplies their difference by w)."""
    module = make_module(tiny_model_dir)
    fixture = fixture_for(module)
    shift = 0.01 * torch.randn(fixture[0].shape, generator=torch.Generator().manual_seed(3))
    base = {}
    readouts.paired_drift(module, fixture, base, [CLASS], guidance=5.0)  # fills the base's predictions
    both = {CLASS: base[CLASS] - shift, "": base[""] - shift}  # the model = base + shift for both prompts
    alone = {CLASS: base[CLASS] - shift, "": base[""]}  # only the class prompt moved
    plain_both, guided_both = readouts.paired_drift(module, fixture, both, [CLASS], guidance=5.0)
    plain_alone, guided_alone = readouts.paired_drift(module, fixture, alone, [CLASS], guidance=5.0)
    assert plain_both == pytest.approx(plain_alone)
    assert guided_both[CLASS] == pytest.approx(plain_both[CLASS], rel=1e-4)  # w e + (1 - w) e = e
    assert guided_alone[CLASS] == pytest.approx(25 * plain_alone[CLASS], rel=1e-4)  # w² times


def hold_module(tiny_model_dir, **kw):
    return make_module(tiny_model_dir, class_prompt=CLASS, uncond_loss_weight=1.0, **kw)


def test_hold_term_is_zero_for_a_zero_lora(tiny_model_dir):
    module = hold_module(tiny_model_dir, hold_weight=1.0, hold_prompts=["a photo of a dog"])
    assert held_prompts(module.hparams) == [CLASS, "a photo of a dog"]
    terms = module.step_losses(fake_batch(), module.step_generator(0), uncond=True)
    assert terms["hold"].shape == (8,) and float(terms["hold"].abs().max()) < 1e-10  # 2 prompts x 4 latents
    # The prompts' own losses are the plain pass's: the extra rows change nothing in them.
    plain = module.diffusion_losses(fake_batch(), module.step_generator(0))
    assert torch.allclose(terms["diffusion"], plain, rtol=1e-5, atol=1e-7)
    bump_lora(module)
    terms = module.step_losses(fake_batch(), module.step_generator(0), uncond=True)
    assert float(terms["hold"].min()) > 0


def class_gap(module) -> float:
    """Mean squared distance of the class prompt's prediction from the frozen base's."""
    return readouts.paired_drift(module, fixture_for(module), {}, [CLASS])[0][CLASS]


def train(module, steps: int) -> None:
    hp = module.hparams
    optimizer = torch.optim.AdamW(module.trainable_groups(), lr=1e-2)
    for step in range(steps):
        batch = fake_batch()
        terms = module.step_losses(batch, module.step_generator(step), uncond=True)
        loss = terms["diffusion"].mean() + hp.uncond_loss_weight * terms["uncond"].mean()
        if "hold" in terms:
            loss = loss + hp.hold_weight * terms["hold"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_hold_term_keeps_the_class_near_the_base_and_never_touches_the_frozen_weights(tiny_model_dir):
    held, free = hold_module(tiny_model_dir, hold_weight=10.0), hold_module(tiny_model_dir)
    frozen = {n: p.detach().clone() for n, p in held.named_parameters() if not p.requires_grad}
    train(free, 3)
    train(held, 3)
    assert all(torch.equal(p, frozen[n]) for n, p in held.named_parameters() if not p.requires_grad)
    gap_free, gap_held = class_gap(free), class_gap(held)
    assert gap_free > 1e-6 and gap_held < 0.3 * gap_free, (gap_free, gap_held)


def test_hold_latents_and_skipped_class_rows(tiny_model_dir):
    module = hold_module(tiny_model_dir, hold_weight=1.0, hold_latents="instance", uncond_latents="instance",
                         prior_loss_weight=0.0)  # fmt: skip
    bump_lora(module)
    terms = module.step_losses(fake_batch(), module.step_generator(0), uncond=True)
    assert terms["hold"].shape == (2,) and terms["uncond"].shape == (2,)  # the 2 instance latents only
    assert terms["diffusion"][2:].tolist() == [0.0, 0.0]  # class images not predicted: weight 0
    plain = module.diffusion_losses(fake_batch(), module.step_generator(0))
    assert torch.allclose(terms["diffusion"][:2], plain[:2], rtol=1e-5, atol=1e-7)


def test_guided_instance_target_is_the_plain_one_at_scale_one_and_shrinks_toward_the_anchor():
    from dallm.objective import guided_target

    target, anchor = torch.ones(2, 3), torch.zeros(2, 3)
    assert guided_target(target, anchor, 1.0) is target
    assert torch.allclose(guided_target(target, anchor, 4.0), torch.full((2, 3), 0.25))
    # The guided prediction anchor + w (pred - anchor) at that target is the target itself.
    pred = guided_target(target, anchor + 0.5, 5.0)
    assert torch.allclose(anchor + 0.5 + 5 * (pred - anchor - 0.5), target)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hold_weight": -1.0, "class_prompt": CLASS}, "--model.hold_weight must be >= 0"),
        ({"hold_weight": 1.0}, "--model.hold_weight needs a prompt"),
        ({"hold_latents": "some"}, "--model.hold_latents"),
        ({"uncond_latents": "some"}, "--model.uncond_latents"),
        ({"hold_prompts": ["a <s1>"]}, "--model.hold_prompts"),
        ({"instance_guidance_scale": 0.5}, "--model.instance_guidance_scale"),
        ({"instance_guidance_anchor": "teacher"}, "--model.instance_guidance_anchor"),
    ],
)
def test_bad_hold_arguments_fail_in_init(kwargs, match):
    from dallm.module import DallmModule

    with pytest.raises(ValueError, match=match):
        DallmModule(instance_prompt=PROMPT, **kwargs)


def test_weight_average_swaps_in_and_restores_exactly():
    from dallm.ema import WeightAverage

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    avg = WeightAverage([("p", p)], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0]))
    avg.update()
    with avg.swapped():
        assert p.tolist() == [2.0, 3.0]  # 0.5 * start + 0.5 * now
    assert p.tolist() == [3.0, 4.0]
    again = WeightAverage([("p", p)], decay=0.5)
    again.load_state_dict(avg.state_dict())
    assert again.average["p"].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="--model.ema_decay"):
        WeightAverage([("p", p)], decay=1.0)


@pytest.mark.slow
def test_report_of_one_run_draws_its_figure_and_readouts(tmp_path, capsys):
    from helpers import fit

    from dallm.sweep.report import report

    fit(tmp_path, "--kid.every_n_steps", "2", "--kid.num_samples", "4", "--kid.num_inference_steps", "2",
        "--kid.feature", "toy", "--model.hold_weight", "1", steps=2, every=2)  # fmt: skip
    assert "readouts, step 2: instance:" in capsys.readouterr().out  # the end-of-run summary
    run = tmp_path / "logs/run/version_0"
    assert report(str(run), out=str(tmp_path / "rep/report.md")) == 0
    text = (tmp_path / "rep/report.md").read_text()
    png = tmp_path / "rep/report.png"
    assert png.stat().st_size > 10_000 and "](report.png)" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "toy/class_circle" in text and "drift/class" in text
    assert rows[0].split("|")[-2].strip() == "0.0000"  # drift/other at step 0: the LoRA is zero
