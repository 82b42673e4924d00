"""One call on a bare NVIDIA machine: install what it lacks, build a random SD v1-5 base, measure, report.

On the GPU machine (the device tool; the tree travels with `.whl/` carried):

    python3 scripts/gpu_check.py            # ~6-8 min on an H100 (estimate: never run on a GPU yet)

It installs the carried wheels (`.whl/*.whl`, see --prepare_wheels) into /tmp/site, puts the tree
itself on PYTHONPATH (what an editable install of dallm does), then runs, each in its own process:

1. `scripts/make_random_base.py --arch sd15 --dtype fp16` (SD v1-5 architecture, random weights);
2. `scripts/bench.py` at 512 px, bf16: batch 8+8, and batch 1+1 with gradient checkpointing; the latent
   cache is filled before timing (bench.py encodes all 20 + 20 distinct images first);
3. `scripts/bench_kid.py` at 512 px, bf16, Inception-v3 (random weights of the real shape);
4. 30 steps of `configs/sd15_baroque_cats.yaml` in bf16-mixed at 512 px with KID every 10 steps (rounds
   at 0, 10, 20, 30), on 20 + 20 held-out procedural teacher images and 20 class images (the config's
   100 would add ~1-2 min of class-image generation and change nothing measured here);

then prints one table and appends every figure to benchmarks/results.jsonl (and to $OUT/results.jsonl
when $OUT is set, so the rows come back from the device machine). `--smoke` runs the same steps on the
CPU at tiny sizes (tiny architecture, 32 px, 2 steps) without installing anything, and writes its rows
to its work directory only: smoke numbers are not figures. The suite runs `--smoke`.

Preparing the wheels, once, on a machine with pip and PyPI (the GPU machine has neither), in the repo root:

    python scripts/gpu_check.py --prepare_wheels     # ~13 MiB into .whl/ (gitignored)

which runs `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
-d .whl` for WHEELS below: the packages dallm needs that the GPU image (Python 3.12, torch, transformers,
lightning, peft, torchmetrics, tensorboard present) lacks, with their own missing requirements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pinned to the versions the suite passes with here; each line: a package and the missing needs it brings.
WHEELS = [
    "diffusers==0.42.1", "importlib_metadata==10.2.0", "lazy-importer==0.1.0",
    "jsonargparse==4.53.0", "docstring_parser==0.18.0", "typeshed_client==2.15.0",
    "torch-fidelity==0.4.0",
    "openai==3.57.0", "httpx2==2.16.2", "httpcore2==2.16.2", "truststore==0.10.5", "jiter==0.19.0",
    "pydantic==2.13.4", "pydantic_core==2.46.4", "annotated-types==0.7.0", "typing-inspection==0.4.2",
    "sniffio==1.3.1",
]  # fmt: skip
SITE = "/tmp/site"


def prepare_wheels(dest: Path) -> None:
    """Download WHEELS for CPython 3.12 on manylinux x86-64 into `dest` (run where PyPI is reachable)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(dest), *WHEELS]  # fmt: skip
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def install_wheels(wheels: Path) -> None:
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(
            f"no wheels in {wheels}: run `python scripts/gpu_check.py --prepare_wheels` here first"
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
         "--upgrade", "--target", SITE, *map(str, found)],
        check=True,
    )  # fmt: skip


def run(cmd: list[str], env: dict, log: Path) -> list[dict]:
    """Run one step, echo its output to `log`, return the JSON objects it printed (one per line)."""
    shown = " ".join(c if len(c) < 400 else "<script>" for c in cmd)
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        raise SystemExit(
            f"step failed (exit {proc.returncode}) after {time.perf_counter() - start:.0f} s: {cmd}"
        )
    print(f"  ok in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{") and line.endswith("}"):
            rows.append(json.loads(line))
    return rows


# Runs the paper's config in-process, then prints one JSON row of its wall time, KID rounds and peak memory.
FIT_RUNNER = """
import json, resource, sys, time, torch
from dallm.measure.callback import KIDCallback
from dallm.cli import main
args = json.loads(sys.argv[1])
start = time.perf_counter()
cli = main(args)
wall = time.perf_counter() - start
kid = next(c for c in cli.trainer.callbacks if isinstance(c, KIDCallback))
cuda = torch.cuda.is_available()
print(json.dumps({"wall_s": wall, "steps": cli.trainer.global_step,
    "kid_rounds": [{k: h[k] for k in ("step", "kid/round_seconds", "kid/val") if k in h} for h in kid.history],
    "peak_memory_gib": (torch.cuda.max_memory_allocated() if cuda else
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
    "card": torch.cuda.get_device_name() if cuda else "CPU (%s)" % __import__("platform").machine()}))
"""


def fit_row(work: Path, base: Path, inception: Path, smoke: bool, env: dict, log: Path) -> list[dict]:
    from_tiny = [sys.executable, "-c", "import sys; from dallm.arch.tiny import make_tiny_images as m; "
                 "m(sys.argv[1], int(sys.argv[2]), seed=int(sys.argv[3]), size=int(sys.argv[4]))"]  # fmt: skip
    res, n, steps, every = (32, 4, 2, 1) if smoke else (512, 20, 30, 10)
    teacher = work / "teacher"
    run([*from_tiny, str(teacher), str(n), "0", str(res)], env, log)
    run([*from_tiny, str(teacher / "val"), str(n), "1", str(res)], env, log)
    samples, sample_steps = (2, 2) if smoke else (20, 25)
    args = [
        "fit", "--config", str(ROOT / "configs/sd15_baroque_cats.yaml"),
        "--model.pretrained_model_name_or_path", str(base),
        "--data.teacher_dir", str(teacher), "--data.num_teacher_images", str(n),
        "--data.prior_dir", str(work / "prior"), "--data.num_prior_images", str(n),
        "--data.resolution", str(res), "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--checkpoint.every_n_train_steps", str(steps),
        "--trainer.logger.init_args.save_dir", str(work / "logs"), "--trainer.enable_progress_bar", "false",
        "--kid.every_n_steps", str(every), "--kid.weights", str(inception),
        "--kid.num_samples", str(samples), "--kid.num_inference_steps", str(sample_steps),
    ]  # fmt: skip
    if smoke:
        args += ["--trainer.accelerator", "cpu", "--data.prior_generation_steps", "2"]
    (out,) = run([sys.executable, "-c", FIT_RUNNER, json.dumps(args)], env, log)
    rounds = out["kid_rounds"]
    kid_s = sum(r["kid/round_seconds"] for r in rounds)
    base_row = {
        "date": date.today().isoformat(), "card": out["card"], "arch": "tiny" if smoke else "sd15",
        "batch_size": 1, "resolution": res, "rank": 4,
        "settings": {"precision": "bf16-mixed", "steps": steps, "kid_every_n_steps": every, "kid_num_samples": samples,
                     "kid_num_inference_steps": sample_steps, "teacher_images": n, "class_images": n,
                     "kid_rounds": rounds, "feature": "inception (random weights)"},
        "command": "python -m dallm fit " + " ".join(args[1:]),
    }  # fmt: skip
    return [
        {**base_row, "metric": "fit_wall_s", "value": round(out["wall_s"], 2), "unit": "s"},
        {**base_row, "metric": "fit_kid_round_s_mean", "value": round(kid_s / len(rounds), 3), "unit": "s"},
        {**base_row, "metric": "fit_train_step_s_approx",
         "value": round((out["wall_s"] - kid_s) / steps, 4), "unit": "s",
         "note": "(fit wall - KID rounds) / steps: includes loading, class images, checkpoints"},
        {**base_row, "metric": "fit_peak_memory_gib", "value": round(out["peak_memory_gib"], 3), "unit": "GiB"},
    ]  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = ["| card | arch | batch | res | metric | value | settings |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("settings", {})
        short = {k: s[k] for k in ("dtype", "precision", "gradient_checkpointing", "feature") if k in s}
        lines.append(f"| {r['card']} | {r['arch']} | {r['batch_size']} | {r['resolution']} | {r['metric']} | "
                     f"{r['value']} {r['unit']} | {json.dumps(short)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny sizes, nothing installed (the suite's check)"
    )
    p.add_argument("--work", default="/tmp/gpu_check", help="scratch directory (base model, images, logs)")
    p.add_argument("--results", default=None,
                   help="JSON-lines file the rows are appended to (default: benchmarks/results.jsonl; "
                        "with --smoke: WORK/results.jsonl)")  # fmt: skip
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of the carried wheels")
    p.add_argument("--prepare_wheels", action="store_true", help="download the wheels into --wheels and exit")
    args = p.parse_args(argv)
    wheels = Path(args.wheels)
    if args.prepare_wheels:
        prepare_wheels(wheels)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    path = [str(ROOT)]
    if not args.smoke:
        install_wheels(wheels)
        path.insert(0, SITE)
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p])
    py = sys.executable
    start = time.perf_counter()

    arch = "tiny" if args.smoke else "sd15"
    base = work / f"{arch}-base"
    run([py, "scripts/make_random_base.py", "--arch", arch, "--out", str(base), "--dtype", "fp16"], env, log)
    inception = work / "inception-random.pth"
    run([py, "-c", "import sys; from dallm.arch import save_random_inception as s; s(sys.argv[1])", str(inception)],
        env, log)  # fmt: skip

    if args.smoke:
        dev = ["--arch", "tiny", "--device", "cpu", "--dtype", "bf16", "--resolution", "32"]
        bench_size, kid_size = (
            ["--steps", "2", "--warmup", "1"],
            ["--num_samples", "2", "--steps", "2", "--rounds", "1"],
        )
    else:
        dev = ["--arch", "sd15", "--device", "cuda", "--dtype", "bf16", "--resolution", "512"]
        bench_size, kid_size = [], []
    rows = []
    rows += run([py, "scripts/bench.py", *dev, "--batch_size", "8", "--json", *bench_size], env, log)
    rows += run([py, "scripts/bench.py", *dev, "--batch_size", "1", "--gradient_checkpointing", "--json",
                 "--skip", "lightning", *bench_size], env, log)  # fmt: skip
    rows += run([py, "scripts/bench_kid.py", *dev, "--feature", "inception", "--weights", str(inception), *kid_size],
                env, log)  # fmt: skip
    rows += fit_row(work, base, inception, args.smoke, env, log)

    print("\n" + table(rows))
    results = Path(args.results) if args.results else (work / "results.jsonl" if args.smoke
                                                       else ROOT / "benchmarks" / "results.jsonl")  # fmt: skip
    outs = [results] + ([Path(os.environ["OUT"]) / "results.jsonl"] if os.environ.get("OUT") else [])
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{len(rows)} rows appended to {', '.join(map(str, outs))}; all in {time.perf_counter() - start:.0f} s "
          f"on {platform.node()}")  # fmt: skip


if __name__ == "__main__":
    main()
