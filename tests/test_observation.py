"""Observation is free and one seed decides a run: the trained LoRA + token weights are a function of the
config's seed alone, never of whether, how often or with which features KID and validation ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fit
from safetensors.torch import load_file

STEPS = 4
KID_OFF = ["--kid.every_n_steps", "0"]
KID_ON = ["--kid.every_n_steps", "2", "--kid.num_samples", "4", "--kid.num_inference_steps", "2"]
VAL_OFF = ["--trainer.limit_val_batches", "0"]


def trained(tmp: Path, name: str, *extra: str) -> dict[str, torch.Tensor]:
    """LoRA + token weights of lora/last after a STEPS-step tiny run (validation every step unless off)."""
    fit(tmp, *extra, steps=STEPS, every=1, name=name)
    last = tmp / "logs" / name / "version_0" / "lora" / "last"
    weights = {}
    info = json.loads((last / "dallm.json").read_text())
    # The diffusers-format files (the kohya copy holds the same tensors under a file name from the run name).
    for file in [last / "pytorch_lora_weights.safetensors", *(last / f for f in info["token_files"])]:
        weights.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    assert any("lora" in k for k in weights) and any(k.startswith("s1.") for k in weights), sorted(weights)
    return weights


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max():.3g}"


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def unobserved(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: no KID, no validation."""
    return trained(tmp_path_factory.mktemp("unobserved"), "run", *KID_OFF, *VAL_OFF)


def test_kid_and_validation_leave_the_weights_unchanged(tmp_path, unobserved):
    assert_identical(unobserved, trained(tmp_path, "kid_val", *KID_ON))


@pytest.mark.slow
@pytest.mark.parametrize(
    "observers",
    [
        pytest.param([*KID_OFF], id="validation-only"),
        pytest.param([*KID_ON, *VAL_OFF], id="kid-every-2"),
        pytest.param([*KID_ON, "--kid.every_n_steps", "1"], id="kid-every-1"),
        pytest.param([*KID_ON, "--kid.feature", "toy"], id="toy-features"),
    ],
)
def test_every_way_of_observing_gives_the_same_weights(tmp_path, unobserved, observers):
    assert_identical(unobserved, trained(tmp_path, "observed", *observers))


@pytest.mark.slow
def test_the_empty_prompt_term_trains_and_is_observation_free_too(tmp_path, unobserved):
    uncond = ["--model.uncond_loss_weight", "2.0"]
    a = trained(tmp_path, "a", *uncond, *KID_OFF, *VAL_OFF)
    b = trained(tmp_path, "b", *uncond, *KID_ON)
    assert_identical(a, b)
    assert differs(unobserved, a)


@pytest.mark.slow
def test_the_hold_term_the_readouts_and_the_average_are_observation_free(tmp_path, unobserved):
    # The base-prediction term on the class prompt and an unrelated prompt, the weight average, and KID
    # rounds with the toy readouts (toy/*, drift/*): the exported (averaged) weights do not depend on them.
    held = ["--model.hold_weight", "1", "--model.uncond_loss_weight", "1", "--model.hold_latents", "instance",
            "--model.hold_prompts", "[a photo of a dog]", "--model.ema_decay", "0.5"]  # fmt: skip
    a = trained(tmp_path, "a", *held, *KID_OFF, *VAL_OFF)
    b = trained(tmp_path, "b", *held, *KID_ON, "--kid.feature", "toy")
    assert_identical(a, b)
    assert differs(unobserved, a)


@pytest.mark.slow
def test_random_token_init_comes_from_the_run_seed(tmp_path):
    random_init = ["--model.initializer_token", "null"]
    a = trained(tmp_path, "a", *random_init, *KID_OFF, *VAL_OFF)
    b = trained(tmp_path, "b", *random_init, *KID_ON)
    assert_identical(a, b)


def test_seed_everything_decides_the_run(tmp_path, unobserved):
    # Two runs with the same seed are equal: the test above (seed 0 with and without KID/validation).
    other = trained(tmp_path, "other", "--seed_everything", "1", *KID_OFF, *VAL_OFF)
    assert differs(unobserved, other)
    # The seeds it resolved to are in the run's config, so the run can be repeated from it alone.
    saved = yaml.safe_load((tmp_path / "logs/other/version_0/config.yaml").read_text())
    assert saved["seed_everything"] == 1 and saved["data"]["seed"] == 1 and saved["kid"]["seed"] == 1


@pytest.mark.slow
def test_data_seed_and_kid_seed_are_overrides(tmp_path, unobserved):
    # --data.seed given: it wins over --seed_everything, for the whole training stream and the init.
    overridden = trained(tmp_path, "data_seed", "--seed_everything", "5", "--data.seed", "0", *KID_OFF, *VAL_OFF)
    assert_identical(unobserved, overridden)
    fit(tmp_path, "--seed_everything", "5", "--kid.seed", "3", *KID_ON, *VAL_OFF, steps=1, every=1, name="kid_seed")
    saved = yaml.safe_load((tmp_path / "logs/kid_seed/version_0/config.yaml").read_text())
    assert (saved["seed_everything"], saved["data"]["seed"], saved["kid"]["seed"]) == (5, 5, 3)
