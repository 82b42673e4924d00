"""`dallm sweep`: a grid of `dallm fit` runs x seeds, on this machine or through submitit (SLURM).

Each run is one `python -m dallm fit --config C.yaml ...` with the grid's flags, `--seed_everything S`
and its own TensorBoard directory `<save_dir>/<sweep name>/<run name>/`; the run name is made from its
settings (`rank=4,num_teacher_images=20,seed=0`), so the same command finds its runs again: a finished
run is skipped, an interrupted one resumes with `--ckpt_path last`, a crashed one is reported while the
others go on. Each run directory holds `sweep_run.json` (flags, status, exit code, job id, log file).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORD = "sweep_run.json"


@dataclass
class SlurmOptions:
    """Resources of each submitit job (SLURM when available, `cluster` decides otherwise)."""

    partition: str | None = None
    time: int = 60
    gpus_per_node: int = 1
    tasks_per_node: int = 1
    nodes: int = 1
    cpus_per_task: int = 8
    mem_gb: int | None = None
    account: str | None = None
    constraint: str | None = None
    additional: dict[str, Any] = field(default_factory=dict)
    cluster: str | None = None


@dataclass(frozen=True)
class Run:
    """One cell of the grid at one seed."""

    name: str
    settings: tuple[tuple[str, str], ...]  # (flag key, value as passed on the command line)
    seed: int


# ---------------------------------------------------------------------------------------- the grid
def parse_grid_item(item: str) -> tuple[str, list[str]]:
    """`model.rank=1,4,16` -> ("model.rank", ["1", "4", "16"])."""
    key, sep, values = item.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not values:
        raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. model.rank=1,4,16)")
    return key, [v.strip() for v in values.split(",")]


def value_text(value: Any) -> str:
    """A grid value as a command-line value: YAML/JSON for lists and dicts, plain text otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Name each flag by its last dotted part (`model.rank` -> `rank`) unless two flags would share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def run_name(settings: tuple[tuple[str, str], ...], seed: int) -> str:
    """`rank=4,num_teacher_images=20,seed=0`: stable, readable, and safe as one directory name."""
    names = short_keys([k for k, _ in settings])
    parts = [f"{names[k]}={re.sub(r'[^A-Za-z0-9_.+-]', '_', v)}" for k, v in settings]
    return ",".join([*parts, f"seed={seed}"])


def expand(grids: list[dict[str, list[Any]]], seeds: list[int]) -> list[Run]:
    """The runs of the union of the product grids, each at every seed, in order, without repeats.

    All grids must vary the same flags, so that a cell two grids share gets one name and runs once.
    """
    if not seeds:
        raise ValueError("--seeds must name at least one seed")
    if not grids:
        grids = [{}]
    keys = list(grids[0])
    for g in grids[1:]:
        if set(g) != set(keys):
            raise ValueError(f"--grids: every grid must set the same flags; got {sorted(keys)} and {sorted(g)}")
    runs: dict[str, Run] = {}
    for g in grids:
        for key, values in g.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"--grid {key}: give a non-empty list of values, got {values!r}")
        for combo in itertools.product(*(g[k] for k in keys)):
            settings = tuple((k, value_text(v)) for k, v in zip(keys, combo, strict=True))
            for seed in seeds:
                name = run_name(settings, seed)
                if name in runs and runs[name].settings != settings:
                    raise ValueError(f"two grid cells give the same run name {name!r}; rename the values")
                runs.setdefault(name, Run(name, settings, seed))
    return list(runs.values())


def fit_args(run: Run, config: list[str], save_dir: Path, sweep_name: str, extra: list[str]) -> list[str]:
    """The `dallm fit` arguments of `run` (without `--ckpt_path`)."""
    args = ["fit"]
    for c in config:
        args += ["--config", str(Path(c).resolve())]
    # One seed decides the run: data order, noise, timesteps, LoRA/token init and KID sampling seeds.
    args += ["--seed_everything", str(run.seed)]
    args += [
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.name", sweep_name,
        "--trainer.logger.init_args.version", run.name,
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    for key, value in run.settings:
        args += [f"--{key}", value]
    return args + list(extra)


# ---------------------------------------------------------------------------------------- run state
def read_record(run_dir: Path) -> dict:
    path = run_dir / RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(run_dir: Path, **fields: Any) -> dict:
    """Merge `fields` into the run's record; written beside and renamed, so never half-written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**read_record(run_dir), **fields}
    tmp = run_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_dir / RECORD)
    return record


def run_state(run_dir: Path) -> str:
    """"done" (finished: skip), "resume" (has checkpoints/last.ckpt) or "new"."""
    if read_record(run_dir).get("status") == "done":
        return "done"
    return "resume" if (run_dir / "checkpoints" / "last.ckpt").exists() else "new"


def prepare(run: Run, run_dir: Path, args: list[str]) -> list[str] | None:
    """The fit arguments to launch now (with `--ckpt_path last` to resume), or None when finished.

    A run directory made by other flags is refused rather than resumed or skipped as if it were this run.
    """
    old = read_record(run_dir).get("args")
    if old is not None and old != args:
        raise ValueError(
            f"{run_dir} was started with other flags; use another --name or remove it.\n"
            f"  then: {' '.join(old)}\n  now:  {' '.join(args)}"
        )
    state = run_state(run_dir)
    if state == "done":
        return None
    if state == "new" and run_dir.exists():
        # Died before its first checkpoint: start afresh rather than append to its half-written events.
        for p in run_dir.iterdir():
            if p.name != RECORD:
                _remove(p)
    write_record(run_dir, name=run.name, settings=dict(run.settings), seed=run.seed, args=args, status="pending")
    return [*args, "--ckpt_path", "last"] if state == "resume" else list(args)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ---------------------------------------------------------------------------------------- launchers
def prime_class_images(arg_lists: list[list[str]]) -> None:
    """Make the class images of every distinct --data.prior_dir once, here, before runs start in parallel.

    Runs sharing a prior dir would otherwise each generate the same missing images at the same time.
    """
    import warnings

    from dallm.cli import TRAINER_DEFAULTS, DallmCLI
    from dallm.data import DallmDataModule
    from dallm.module import DallmModule

    seen_args, done = set(), set()
    for args in arg_lists:
        if "--ckpt_path" in args:  # resuming runs found their class images already
            continue
        # Runs that differ only in their seed or logger version share their class images.
        drop = {"--seed_everything", "--trainer.logger.init_args.version"}
        key_args = tuple(a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop))
        if key_args in seen_args:
            continue
        seen_args.add(key_args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningCLI's note on args given in-process
            cli = DallmCLI(DallmModule, DallmDataModule, trainer_defaults=TRAINER_DEFAULTS,
                           auto_configure_optimizers=False, run=False, args=args[1:])  # fmt: skip
        dm = cli.datamodule
        key = str(Path(dm.hparams.prior_dir).resolve()) if dm.with_prior_preservation else ""
        if key and key not in done:
            dm.prepare_data()
            done.add(key)


def visible_gpus() -> list[str]:
    """GPU ids this process may use (CUDA_VISIBLE_DEVICES if set), without initialising CUDA here."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def launch_local(jobs: list[tuple[Run, Path, list[str]]], log_dir: Path, max_parallel: int, gpus_per_run: int) -> dict[str, int]:
    """Run each job as `python -m dallm fit ...`, up to `max_parallel` at once; returns {name: exit code}.

    With GPUs each process sees its own `gpus_per_run` of them through CUDA_VISIBLE_DEVICES.
    """
    gpus = visible_gpus()
    groups = [gpus[i : i + gpus_per_run] for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
    slots: list[list[str] | None] = list(groups) if groups else [None] * max_parallel
    slots = slots[:max_parallel]
    free = list(range(len(slots)))
    pending = list(jobs)
    running: dict[subprocess.Popen, tuple[Run, Path, int, Any]] = {}
    codes: dict[str, int] = {}
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        while pending or running:
            while pending and free:
                run, run_dir, args = pending.pop(0)
                slot = free.pop(0)
                env = dict(os.environ)
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(slots[slot])
                log_path = log_dir / f"{run.name}.log"
                log = open(log_path, "a")
                log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m dallm {' '.join(args)}\n")
                log.flush()
                proc = subprocess.Popen([sys.executable, "-m", "dallm", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
                write_record(run_dir, status="running", log=str(log_path), pid=proc.pid, gpus=slots[slot])
                print(f"dallm sweep: started {run.name} (pid {proc.pid}{', GPUs ' + ','.join(slots[slot]) if slots[slot] else ''})", flush=True)
                running[proc] = (run, run_dir, slot, log)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                run, run_dir, slot, log = running.pop(proc)
                log.close()
                free.append(slot)
                codes[run.name] = proc.returncode
                finish(run, run_dir, proc.returncode)
    finally:
        for proc, (run, run_dir, _, log) in running.items():  # interrupted: stop the children, keep records honest
            proc.terminate()
            proc.wait()
            log.close()
            write_record(run_dir, status="interrupted", returncode=proc.returncode)
    return codes


def finish(run: Run, run_dir: Path, code: int) -> None:
    write_record(run_dir, status="done" if code == 0 else "failed", returncode=code)
    print(f"dallm sweep: {run.name} {'finished' if code == 0 else f'FAILED (exit {code})'}", flush=True)


class FitJob:
    """A submitit job: `dallm fit` in the job's own process (all SLURM tasks, so Lightning's DDP sees them).

    On a SLURM timeout or preemption submitit calls `checkpoint` and requeues the same job, which then
    resumes from `last.ckpt` like a restarted sweep.
    """

    def __init__(self, run_dir: str, args: list[str]) -> None:
        self.run_dir, self.args = run_dir, args

    def __call__(self) -> int:
        from dallm.cli import main

        run_dir = Path(self.run_dir)
        resume = (run_dir / "checkpoints" / "last.ckpt").exists()
        args = [*self.args, "--ckpt_path", "last"] if resume else list(self.args)
        rank0 = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))) == 0
        try:
            main(args)
            code = 0
        except SystemExit as err:  # dallm's one-line errors
            code = err.code if isinstance(err.code, int) else 1
        if rank0:
            write_record(run_dir, status="done" if code == 0 else "failed", returncode=code)
        if code != 0:
            raise RuntimeError(f"dallm fit failed (exit {code}): see {run_dir / RECORD}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(FitJob(self.run_dir, self.args))


def launch_submitit(
    jobs: list[tuple[Run, Path, list[str]]], folder: Path, slurm: SlurmOptions, max_parallel: int, name: str, wait: bool
) -> dict[str, int]:
    """Submit each job through submitit (one SLURM job array); record job ids; wait for them if `wait`."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=slurm.cluster)
    params: dict[str, Any] = {
        "name": name, "timeout_min": slurm.time, "nodes": slurm.nodes, "tasks_per_node": slurm.tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task, "slurm_array_parallelism": max_parallel,
    }  # fmt: skip
    if executor.cluster == "slurm":
        params.update(gpus_per_node=slurm.gpus_per_node, slurm_partition=slurm.partition, slurm_account=slurm.account,
                      slurm_constraint=slurm.constraint, slurm_additional_parameters=slurm.additional or None)  # fmt: skip
        if slurm.mem_gb is not None:
            params["mem_gb"] = slurm.mem_gb
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    for _, run_dir, _ in jobs:  # before submitting: a quick job's own "done" must not be overwritten
        write_record(run_dir, status="submitted", executor=executor.cluster)
    with executor.batch():
        submitted = [(run, run_dir, executor.submit(FitJob(str(run_dir), args))) for run, run_dir, args in jobs]
    for run, run_dir, job in submitted:
        write_record(run_dir, job_id=str(job.job_id), log=str(job.paths.stdout), stderr=str(job.paths.stderr))
        print(f"dallm sweep: submitted {run.name} as job {job.job_id} ({executor.cluster})", flush=True)
    codes: dict[str, int] = {}
    if not wait:
        return codes
    for run, run_dir, job in submitted:
        try:
            codes[run.name] = job.result()
            write_record(run_dir, status="done", returncode=0)
        except Exception as err:  # one failed job is reported; the others are still collected
            codes[run.name] = 1
            write_record(run_dir, status="failed", error=" ".join(str(err).split())[-2000:])
        print(f"dallm sweep: {run.name} {'finished' if codes[run.name] == 0 else 'FAILED'} (job {job.job_id})", flush=True)
    return codes


# ---------------------------------------------------------------------------------------- the command
def sweep(
    config: str,
    grid: list[str] | None = None,
    grids: list[dict[str, list[Any]]] | None = None,
    seeds: list[int] = [0],  # noqa: B006 (jsonargparse needs a literal default)
    name: str | None = None,
    save_dir: str = "lightning_logs",
    launcher: str = "local",
    max_parallel: int = 1,
    gpus_per_run: int = 1,
    slurm: SlurmOptions = SlurmOptions(),  # noqa: B008
    wait: bool = True,
    prime: bool = True,
    extra: list[str] = [],  # noqa: B006
    dry_run: bool = False,
) -> int:
    """Run `dallm fit --config CONFIG` over a grid of settings x seeds; finished runs are skipped.

        python -m dallm sweep --config configs/toy.yaml --grid model.rank=1,4,16 \\
            --grid data.num_teacher_images=5,20 --seeds 0,1,2 --max_parallel 2 -- --trainer.max_steps 500
        python -m dallm sweep --sweep_file sweeps/toy_paper.yaml          # the same keys in YAML

    Runs go to SAVE_DIR/NAME/<run name>/ (TensorBoard: `tensorboard --logdir SAVE_DIR/NAME`). Flags after
    `--` go to every run. The same command again skips finished runs, resumes interrupted ones from
    their last.ckpt and retries failed ones. Exit status 1 when a run failed (the others still ran).

    Args:
        config: the `dallm fit` config of every run.
        grid: one flag and its values, KEY=V1,V2,... (e.g. model.rank=1,4,16); repeat --grid for a product.
        grids: in a sweep file: a list of product grids ({flag: [values]}), run as their union; every
            grid must set the same flags.
        seeds: seeds of every cell (`--seed_everything S`), e.g. 0,1,2.
        name: sweep name, the TensorBoard logger name; default: sweep_<config file stem>.
        save_dir: root of the run directories.
        launcher: "local" (processes on this machine) or "submitit" (SLURM jobs, or submitit's local or
            debug executor with --slurm.cluster local|debug).
        max_parallel: runs at once (local), or the SLURM array's parallelism (submitit).
        gpus_per_run: GPUs each local run sees (CUDA_VISIBLE_DEVICES); a run that uses several also needs
            --trainer.devices N among the extra flags.
        slurm: job resources for --launcher submitit: partition, time (minutes), gpus_per_node,
            tasks_per_node (= --trainer.devices for DDP), nodes (= --trainer.num_nodes), cpus_per_task,
            mem_gb, account, constraint, additional (other sbatch options), cluster (null: SLURM when
            available, else local; "local"; "debug": in this process).
        wait: wait for submitted jobs and report their outcome (local launches always wait).
        prime: before runs start in parallel, make their missing class images once, in this process
            (on a SLURM login node: --prime false, and make them once with a single run first).
        extra: more `dallm fit` flags for every run (also: everything after `--`).
        dry_run: print the runs and their commands; launch nothing.
    """
    if launcher not in ("local", "submitit"):
        raise ValueError(f"--launcher must be local or submitit, got {launcher!r}")
    if max_parallel < 1 or gpus_per_run < 1:
        raise ValueError(f"--max_parallel and --gpus_per_run must be >= 1, got {max_parallel}, {gpus_per_run}")
    if not Path(config).is_file():
        raise ValueError(f"--config {config}: no such file")
    all_grids = [dict(g) for g in grids or []]
    if grid:
        all_grids.append(dict(parse_grid_item(item) for item in grid))
    runs = expand(all_grids, seeds)
    name = name or f"sweep_{Path(config).stem}"
    root = Path(save_dir).resolve() / name
    to_launch, skipped = [], []
    for run in runs:
        args = fit_args(run, [config], Path(save_dir).resolve(), name, extra)
        run_dir = root / run.name
        if dry_run:
            print(f"{run.name} [{run_state(run_dir)}]: python -m dallm {' '.join(args)}")
            continue
        launch = prepare(run, run_dir, args)
        if launch is None:
            skipped.append(run.name)
        else:
            to_launch.append((run, run_dir, launch))
    if dry_run:
        return 0
    root.mkdir(parents=True, exist_ok=True)
    spec = {"config": str(Path(config).resolve()), "grids": all_grids, "seeds": seeds, "extra": extra,
            "launcher": launcher, "runs": [r.name for r in runs]}  # fmt: skip
    (root / "sweep.json").write_text(json.dumps(spec, indent=1))
    resumed = sum(a[-2:] == ["--ckpt_path", "last"] for _, _, a in to_launch)
    print(f"dallm sweep {name}: {len(runs)} runs: {len(skipped)} finished (skipped), {resumed} to resume, "
          f"{len(to_launch) - resumed} to start; logs under {root}", flush=True)  # fmt: skip
    parallel = launcher == "submitit" or max_parallel > 1
    if prime and parallel and len(to_launch) > 1:
        prime_class_images([a for _, _, a in to_launch])
    if launcher == "local":
        codes = launch_local(to_launch, root / "logs", max_parallel, gpus_per_run)
    else:
        codes = launch_submitit(to_launch, root / "submitit", slurm, max_parallel, name, wait)
    failed = sorted(n for n, c in codes.items() if c != 0)
    for n in failed:
        print(f"dallm sweep: failed: {n} (see {root / n / RECORD})", file=sys.stderr)
    print(f"dallm sweep {name}: {len(codes) - len(failed)} finished now, {len(failed)} failed, {len(skipped)} skipped")
    return 1 if failed else 0


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept the natural spellings `--grid A --grid B`, `--seeds 0,1,2`, `--dry_run` and `-- FIT FLAGS...`."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    out, grids = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--grid" and i + 1 < len(argv):
            grids.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--grid="):
            grids.append(a.split("=", 1)[1])
        elif a in ("--dry_run", "--wait") and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out += [a, "true"]  # a bare switch
        elif a == "--seeds" and i + 1 < len(argv) and re.fullmatch(r"-?\d+(,-?\d+)*", argv[i + 1]):
            out += [a, f"[{argv[i + 1]}]"]
            i += 2
            continue
        else:
            out.append(a)
        i += 1
    if grids:
        out += ["--grid", json.dumps(grids)]
    if extra:
        out += ["--extra", json.dumps(extra)]
    return out


def sweep_main(argv: list[str]) -> int:
    """`python -m dallm sweep ...` (see `sweep`); bad input: one line naming the flag, exit 2."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="dallm sweep", description=sweep.__doc__.split("\n\n")[0])
    parser.add_argument("--sweep_file", action=ActionConfigFile, help="a YAML file with any of the flags below")
    parser.add_function_arguments(sweep, as_group=False)
    cfg = parser.parse_args(_normalise_argv(argv))
    import signal

    # scancel / kill send SIGTERM: stop the runs and record them as interrupted, as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    kwargs = instantiate(cfg).as_dict()
    kwargs.pop("sweep_file", None)
    try:
        return sweep(**kwargs)
    except KeyboardInterrupt:
        print("dallm sweep: interrupted; the same command resumes it", file=sys.stderr)
        return 130
    except ValueError as err:
        if os.environ.get("DALLM_TRACEBACK"):
            raise
        print(f"dallm sweep: error: {err}", file=sys.stderr)
        return 2
