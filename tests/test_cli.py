"""The CLI end to end on the tiny model: configs, fit, TensorBoard, checkpoints, exact resume, DDP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, TINY, fit, trainable
from safetensors.torch import load_file

from dallm.cli import main


@pytest.mark.parametrize(
    "config", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")), ids=str
)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # Linked values are set once: the prompt under data, the base model under model.
    assert "<s1>" in printed["data"]["instance_prompt"] and "instance_prompt" not in printed["model"]
    assert (
        printed["model"]["pretrained_model_name_or_path"]
        and "pretrained_model_name_or_path" not in printed["data"]
    )
    # The first line of every config is the command that runs it.
    assert (ROOT / config).read_text().splitlines()[0] == f"# python -m dallm fit --config {config}"


def test_help_lists_documented_flags(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--model.rank",
        "--model.placeholder_tokens",
        "--data.teacher_dir",
        "--checkpoint.every_n_train_steps",
    ):
        assert flag in out
    assert "LoRA rank r" in out


@pytest.mark.slow
def test_fit_logs_checkpoints_and_exports(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tmp_path, steps=4, every=2)
    run = tmp_path / "logs" / "run" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["rank"] == 4 and saved["trainer"]["max_steps"] == 4

    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/loss_instance",
        "train/loss_prior",
        "train/lr_lora",
        "train/lr_tokens",
        "val/loss",
        "params/trainable",
        "params/trainable_ratio",
    ):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("val/loss")] == [1, 3]  # after optimizer steps 2 and 4
    assert all(e.value > 0 for e in events.Scalars("train/loss_prior"))

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    # Only what trains is in the checkpoint (plus optimizer/loop state), never the frozen base.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"] and ckpt["loops"]
    assert all("lora_" in k or k.endswith("new_embeddings") for k in ckpt["state_dict"])

    for step in ("step=000002", "step=000004", "last"):
        files = {p.name for p in (run / "lora" / step).iterdir()}
        assert {"pytorch_lora_weights.safetensors", "s1.safetensors", "s2.safetensors", "dallm.json"} <= files
    last = load_file(run / "lora" / "last" / "s1.safetensors")
    assert last["<s1>"].shape[0] == 1  # (1, D), as diffusers writes a textual-inversion file
    assert torch.allclose(
        last["<s1>"][0], next(v for k, v in ckpt["state_dict"].items() if k.endswith("new_embeddings"))[0]
    )

    # Class images were generated once into the prior dir, with a manifest line per image.
    assert len(list((tmp_path / "prior").glob("*.png"))) == 4
    assert len((tmp_path / "prior" / "manifest.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_checkpoint_is_small(tmp_path):
    fit(tmp_path, "--model.rank", "1", steps=1, every=1)
    path = tmp_path / "logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    base_bytes = sum(f.stat().st_size for f in (ROOT / "assets/tiny/base").rglob("*.safetensors"))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    tensors = list(ckpt["state_dict"].values())
    tensors += [
        t for s in ckpt["optimizer_states"][0]["state"].values() for t in s.values() if torch.is_tensor(t)
    ]
    payload = sum(t.numel() * t.element_size() for t in tensors)
    assert payload < 0.05 * base_bytes
    # The file adds ~0.5 KB of zip framing per tensor, which dominates only at toy scale (113 tiny
    # tensors here); it stays far below the base model, which would be 100%.
    assert path.stat().st_size < 0.10 * base_bytes


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    fit(tmp_path, steps=8, every=4, name="straight")
    fit(tmp_path, steps=4, every=4, name="resumed")
    fit(tmp_path, "--ckpt_path", "last", steps=8, every=4, name="resumed")
    straight = trainable(tmp_path / "logs/straight/version_0/checkpoints/last.ckpt")
    resumed_ckpt = tmp_path / "logs/resumed/version_0/checkpoints/last.ckpt"
    assert not (tmp_path / "logs/resumed/version_1").exists()  # resumed in place, curves continue
    assert torch.load(resumed_ckpt, map_location="cpu", weights_only=True)["global_step"] == 8
    resumed = trainable(resumed_ckpt)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), (key, (straight[key] - resumed[key]).abs().max())
    # and training moved the weights at all between steps 4 and 8
    at4 = trainable(tmp_path / "logs/resumed/version_0/checkpoints/step=000004.ckpt")
    assert any(not torch.allclose(at4[k], resumed[k]) for k in at4)


def one_line_error(capsys, run) -> str:
    """Run `run`, expect dallm's one-line error exit (code 2), return the error line."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("dallm: error: ")
    return lines[-1]


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    line = one_line_error(capsys, lambda: fit(tmp_path, "--ckpt_path", "last"))
    assert "--ckpt_path last: no readable checkpoints/last.ckpt" in line


@pytest.mark.slow
def test_validate_subcommand_scores_a_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tmp_path, steps=2, every=2)
    ckpt = tmp_path / "logs/run/version_0/checkpoints/last.ckpt"
    args = [
        "validate",
        "--config",
        str(TINY),
        "--ckpt_path",
        str(ckpt),
        "--model.pretrained_model_name_or_path",
        str(ROOT / "assets/tiny/base"),
        "--data.teacher_dir",
        str(ROOT / "assets/tiny/teacher"),
        "--data.prior_dir",
        str(tmp_path / "prior"),
        "--data.num_prior_images",
        "4",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "val_logs"),
    ]
    main(args)
    events = EventAccumulator(str(tmp_path / "val_logs/tiny/version_0")).Reload()
    fit_val = EventAccumulator(str(tmp_path / "logs/run/version_0")).Reload().Scalars("val/loss")[-1].value
    # Same checkpoint, same fixed per-image noise: validate reproduces fit's last validation loss.
    assert events.Scalars("val/loss")[0].value == pytest.approx(fit_val, rel=1e-5)


@pytest.mark.slow
def test_lr_scheduler_is_injected_and_stepped_per_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(
        tmp_path,
        "--model.lr_scheduler",
        "torch.optim.lr_scheduler.LinearLR",
        "--model.lr_scheduler.start_factor",
        "0.25",
        "--model.lr_scheduler.total_iters",
        "2",
        "--model.optimizer.lr",
        "0.004",
        "--trainer.log_every_n_steps",
        "1",
        steps=3,
        every=3,
    )
    events = EventAccumulator(str(tmp_path / "logs/run/version_0")).Reload()
    lrs = [e.value for e in events.Scalars("train/lr_lora")]
    assert lrs == pytest.approx([0.001, 0.0025, 0.004])


@pytest.mark.slow
def test_ddp_two_processes_end_identical(tmp_path):
    probe = tmp_path / "probe.yaml"
    probe.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {"class_path": "rank_probe.SaveRankWeights", "init_args": {"out_dir": str(tmp_path)}}
                    ]
                }
            }
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "dallm",
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(probe),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.max_steps",
        "3",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.val_check_interval",
        "3",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--data.prior_dir",
        str(tmp_path / "prior"),
        "--data.num_prior_images",
        "4",
        "--data.batch_size",
        "2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    w0 = load_file(tmp_path / "rank0.safetensors")
    w1 = load_file(tmp_path / "rank1.safetensors")
    seen0 = set(load_file(tmp_path / "rank0.safetensors").keys())
    assert seen0 == set(w1) and len(w0) > 0
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    # each rank saw its own shard of the teacher stream
    assert (tmp_path / "rank0.txt").read_text() != (tmp_path / "rank1.txt").read_text()
    # class images generated once, by rank 0
    assert len((tmp_path / "prior" / "manifest.jsonl").read_text().splitlines()) == 4
    assert len(list((tmp_path / "logs").rglob("lora/last/pytorch_lora_weights.safetensors"))) == 1
    # KID rounds (step 0 and the end) ran with each rank sampling its share of the seeds.
    assert len(list((tmp_path / "logs").rglob("samples/step=000003.png"))) == 1
    assert "dallm: step 3: kid/train" in result.stderr + result.stdout


def test_dallm_alone_and_help_name_dallm_and_list_every_command_with_one_line(capsys):
    from dallm.cli import COMMANDS, DallmCLI

    commands = [*DallmCLI.subcommands(), *COMMANDS]
    assert set(commands) == {"fit", "validate", "teacher", "kid", "sample", "export", "sweep", "report"}
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dallm ") and "__main__" not in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()]
    assert sorted(listed) == sorted(commands)  # each command on exactly one line
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: dallm [options] fit ")


@pytest.mark.slow  # a fresh interpreter's imports: 5 s of the fast loop
def test_python_m_dallm_alone_prints_the_same_list_and_exits_2(capsys):
    """`python -m dallm` alone: the --help list, exit 2 (no command given); the prog is dallm, not __main__.py."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bare = subprocess.run([sys.executable, "-m", "dallm"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bare.returncode == 2 and bare.stdout == out and "__main__" not in bare.stdout
