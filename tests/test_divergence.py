"""A diverged run stops with one clear line and a non-zero exit, and leaves only finite weights behind."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import fit
from safetensors.torch import load_file

# lr 1e4 on the tiny model: step 0 is finite, the second update makes the weights (and so the loss) non-finite.
DIVERGE = ["--model.optimizer.init_args.lr", "1e4", "--model.token_lr", "1e4"]


@pytest.mark.slow  # a fit with KID every step; the first-step case below stays in the fast loop
def test_non_finite_loss_stops_the_run_and_keeps_the_last_finite_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, *DIVERGE, "--kid.every_n_steps", "1", "--kid.num_samples", "4",
            "--kid.num_inference_steps", "2", steps=20, every=1)  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("dallm: error:"))
    assert "diverged" in line and re.search(r"step \d+", line), line

    run = tmp_path / "logs/run/version_0"
    files = list(run.rglob("*.safetensors"))
    assert files
    for file in files:
        for key, value in load_file(file).items():
            assert torch.isfinite(value).all(), f"{file}: {key}"
    ckpts = list(run.rglob("*.ckpt"))
    assert ckpts
    for ckpt in ckpts:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] < 20  # it stopped early
        for key, value in state["state_dict"].items():
            assert torch.isfinite(value).all(), f"{ckpt}: {key}"

    # lora/last is the newest finite export, untouched by the divergence.
    exports = sorted((run / "lora").glob("step=*"))
    assert exports
    newest = exports[-1]
    for file in (run / "lora/last").glob("*.safetensors"):
        a, b = load_file(file), load_file(newest / file.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file.name

    # No KID value was logged for a non-finite model: every logged KID is finite.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    for tag in events.Tags()["scalars"]:
        if tag.startswith("kid/"):
            assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars(tag)), tag


def test_non_finite_loss_at_the_first_step_writes_nothing(tmp_path, capsys):
    # A prior weight of 1e39 overflows the fp32 total loss at step 0: the loss check, before any update.
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--model.prior_loss_weight", "1e39", steps=4, every=1)
    assert exit_info.value.code == 2
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("dallm: error:"))
    assert "diverged at step 0: non-finite total loss" in line, line
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("*.safetensors"))


def test_kid_round_skips_a_non_finite_model(tmp_path):
    from types import SimpleNamespace

    from dallm.measure.callback import KIDCallback

    class Broken:
        device = torch.device("cpu")

        def nonfinite_parameters(self):
            return ["unet.lora_A"]

    cb = KIDCallback(every_n_steps=1)
    cb.run_round(SimpleNamespace(global_step=3), Broken())  # would fail if it tried to sample
    assert cb.history == []
