"""A run interrupted at some step and resumed with `--ckpt_path last` logs the same curves as one that never
stopped: no extra KID round at the resume step, no missing or duplicated point, every value bit-identical."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from helpers import fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STEPS = 8
# KID at 0, 3, 6 and the end; train/loss every 2nd step; a checkpoint every step so any step can resume.
# The readouts (toy heads, paired drift) ride on the KID rounds; with the weight average on they are taken
# of the average, which the checkpoint must carry for the curves to continue unchanged.
ARGS = [
    "--kid.every_n_steps", "3", "--kid.num_samples", "4", "--kid.num_inference_steps", "2",
    "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "4",
    "--kid.feature", "toy", "--model.ema_decay", "0.5", "--model.hold_weight", "1",
]  # fmt: skip
TAGS = ("kid/val", "kid/train", "train/loss", "train/loss_prior", "val/loss", "train/loss_hold",
        "toy/instance_circle", "toy/class_colour_tv", "drift/class", "drift/other")  # fmt: skip


class Interrupted(Exception):
    pass


class StopAt(pl.Callback):
    """Interrupt the run as a crash would, once step `step` is checkpointed and logged."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"stopped at step {self.step}")


def curves(run) -> dict[str, list[tuple[int, float]]]:
    # purge_orphaned_data off: a repeated or out-of-order step must show, not be silently dropped.
    events = EventAccumulator(str(run), purge_orphaned_data=False).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in TAGS}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    fit(tmp, *ARGS, steps=STEPS, every=1)
    out = curves(tmp / "logs/run/version_0")
    assert [s for s, _ in out["kid/val"]] == [0, 3, 6, 8]
    assert [s for s, _ in out["train/loss"]] == [1, 3, 5, 7]
    return out


def resumed(tmp, stop: int) -> dict[str, list[tuple[int, float]]]:
    callback = ["--trainer.callbacks+=test_resume_curves.StopAt", f"--trainer.callbacks.step={stop}"]
    with pytest.raises(Interrupted):
        fit(tmp, *ARGS, *callback, steps=STEPS, every=1)
    fit(tmp, *ARGS, "--ckpt_path", "last", steps=STEPS, every=1)
    assert len(list((tmp / "logs/run").iterdir())) == 1  # resumed in place: one run directory
    return curves(tmp / "logs/run/version_0")


# Every kind of step to stop at: the first, a KID step, a validation + checkpoint step, one that is neither,
# the last before the end. A fixed list: the same steps are tested on every run of the suite.
@pytest.mark.slow
@pytest.mark.parametrize("stop", [1, 3, 4, 5, 7])
def test_resumed_curves_equal_the_uninterrupted_ones(tmp_path, uninterrupted, stop):
    got = resumed(tmp_path, stop)
    for tag in TAGS:
        assert [s for s, _ in got[tag]] == [s for s, _ in uninterrupted[tag]], (tag, stop)
        assert got[tag] == uninterrupted[tag], (tag, stop)  # bit-identical
