"""The toy world proves the training path works: a short run must clearly move KID toward the teacher.

A broken loss, LoRA, token path or data path leaves kid/val where the base model put it, and fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dallm.cli import main

ROOT = Path(__file__).resolve().parents[1]
# The default run's length (configs/toy.yaml), with KID only at step 0 and the end and 20 class images.
# Measured (RESULTS.md, "Keeping the class"): the default ends at 0.14-0.49x its step-0 kid/val for seeds
# 0-9; this run, seed 0 with 20 class images, 0.0390 -> 0.0127 (0.33x), class samples 0% teacher world and
# 100% circles, kid/prior 0.0003. The bound leaves a margin for the seed-to-seed spread; a run that learns
# nothing stays ~1x.
STEPS = 250
MAX_RATIO = 0.7
READOUTS = ("toy/class_teacher_world", "toy/class_circle", "kid/prior", "toy/instance_teacher_world")
# The targets for the class samples (RESULTS.md: the default meets them on seeds 0-9).
CLASS_TEACHER_WORLD_MAX, CLASS_CIRCLE_MIN, KID_PRIOR_MAX = 0.1, 0.9, 0.01


@pytest.mark.slow
def test_default_toy_run_moves_kid_toward_the_teacher(tmp_path):
    main(
        [
            "fit", "--config", str(ROOT / "configs/toy.yaml"),
            "--model.pretrained_model_name_or_path", str(ROOT / "dallm/toy/assets/base"),
            "--data.teacher_dir", str(ROOT / "dallm/toy/assets/teacher"),
            "--data.prior_dir", str(tmp_path / "prior"), "--data.num_prior_images", "20",
            "--trainer.max_steps", str(STEPS), "--kid.every_n_steps", str(STEPS),
            "--trainer.val_check_interval", str(STEPS), "--checkpoint.every_n_train_steps", str(STEPS),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    events = EventAccumulator(str(tmp_path / "logs/toy/version_0")).Reload()
    val = {e.step: e.value for e in events.Scalars("kid/val")}
    assert sorted(val) == [0, STEPS]
    assert val[STEPS] < MAX_RATIO * val[0], val
    # and the VAE floor is far below where the base model starts: the drop is reachable at all
    floor = events.Scalars("kid/val_floor")[0].value
    assert floor < 0.25 * val[0], (floor, val[0])
    # The class prompt kept (the base-prediction term): its samples still read as the base's world and
    # circles, and kid/prior stays near 0 (a LoRA that bleeds into the class fails here: 0.04, 95% teacher
    # world before the term). The instance prompt took the teacher's world.
    last = {tag: events.Scalars(tag)[-1].value for tag in READOUTS}
    assert last["toy/class_teacher_world"] <= CLASS_TEACHER_WORLD_MAX, last
    assert last["toy/class_circle"] >= CLASS_CIRCLE_MIN, last
    assert last["kid/prior"] <= KID_PRIOR_MAX, last
    assert last["toy/instance_teacher_world"] >= 0.9, last
