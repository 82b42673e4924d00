"""Launchers of `dallm sweep`: processes on this machine, or jobs through submitit (SLURM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dallm.ranges import Count, NonNegativeInt

RECORD = "sweep_run.json"  # in each run directory: flags, status, exit code, log, job id


@dataclass
class SlurmOptions:
    """Resources of each submitit job (SLURM when available, `cluster` decides otherwise)."""

    partition: str | None = None
    time: Count = 60
    gpus_per_node: NonNegativeInt = 1
    tasks_per_node: Count = 1
    nodes: Count = 1
    cpus_per_task: Count = 8
    mem_gb: Count | None = None
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


def prime_class_images(arg_lists: list[list[str]]) -> None:
    """Make the class images of every distinct --data.prior_dir once, here, before runs start in parallel.

    Runs sharing a prior dir would otherwise each generate the same missing images at the same time.
    """
    import warnings

    from dallm.cli import TRAINER_DEFAULTS, DallmCLI
    from dallm.data.datamodule import DallmDataModule
    from dallm.module import DallmModule

    seen_args, done = set(), set()
    for args in arg_lists:
        if "--ckpt_path" in args:  # resuming runs found their class images already
            continue
        # Runs that differ only in their seed or logger version share their class images.
        drop = {"--seed_everything", "--trainer.logger.init_args.version"}
        key_args = tuple(
            a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)
        )
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


def launch_local(
    jobs: list[tuple[Run, Path, list[str]]], log_dir: Path, max_parallel: int, gpus_per_run: int
) -> dict[str, int]:
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
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dallm", *args], stdout=log, stderr=subprocess.STDOUT, env=env
                )
                write_record(run_dir, status="running", log=str(log_path), pid=proc.pid, gpus=slots[slot])
                print(
                    f"dallm sweep: started {run.name} (pid {proc.pid}{', GPUs ' + ','.join(slots[slot]) if slots[slot] else ''})",
                    flush=True,
                )
                running[proc] = (run, run_dir, slot, log)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                run, run_dir, slot, log = running.pop(proc)
                log.close()
                free.append(slot)
                codes[run.name] = proc.returncode
                finish(run, run_dir, proc.returncode)
    finally:
        for proc, (
            _run,
            run_dir,
            _,
            log,
        ) in running.items():  # interrupted: stop the children, keep records honest
            proc.terminate()
            proc.wait()
            log.close()
            write_record(run_dir, status="interrupted", returncode=proc.returncode)
    return codes


# Exit statuses of a run stopped by a signal (SIGTERM: dallm fit saved last.ckpt and exits 143; SIGINT: 130;
# or killed by one before its handler was set): not done, resumed by the next `dallm sweep`.
INTERRUPTED = {143, 130, -15, -2, -9, 137}


def status_of(code: int) -> str:
    """A run's record status from its exit status: done, interrupted (resumable) or failed."""
    return "done" if code == 0 else "interrupted" if code in INTERRUPTED else "failed"


def finish(run: Run, run_dir: Path, code: int) -> None:
    status = status_of(code)
    write_record(run_dir, status=status, returncode=code)
    what = {"done": "finished", "interrupted": f"interrupted (exit {code}; the same sweep resumes it)"}
    print(f"dallm sweep: {run.name} {what.get(status, f'FAILED (exit {code})')}", flush=True)


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
            write_record(run_dir, status=status_of(code), returncode=code)
        if code != 0:
            raise RuntimeError(f"dallm fit failed (exit {code}): see {run_dir / RECORD}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(FitJob(self.run_dir, self.args))


def launch_submitit(
    jobs: list[tuple[Run, Path, list[str]]],
    folder: Path,
    slurm: SlurmOptions,
    max_parallel: int,
    name: str,
    wait: bool,
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
        submitted = [
            (run, run_dir, executor.submit(FitJob(str(run_dir), args))) for run, run_dir, args in jobs
        ]
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
        print(
            f"dallm sweep: {run.name} {'finished' if codes[run.name] == 0 else 'FAILED'} (job {job.job_id})",
            flush=True,
        )
    return codes
