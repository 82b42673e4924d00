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
import sys
from pathlib import Path
from typing import Any

from dallm.errors import PARSER_KWARGS
from dallm.ranges import Count, Seed
from dallm.sweep.launch import (
    RECORD,
    Run,
    SlurmOptions,
    launch_local,
    launch_submitit,
    prime_class_images,
    read_record,
    status_of,
    write_record,
)


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
            raise ValueError(
                f"--grids: every grid must set the same flags; got {sorted(keys)} and {sorted(g)}"
            )
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


# jsonargparse's words for a flag `dallm fit` does not have (as opposed to a value it refuses).
_UNKNOWN_FLAG = ("nrecognized arguments", "is not accepted", "is not expected", "No action for key")


def check_runs(runs: list[Run], arg_lists: list[list[str]]) -> dict[str, str]:
    """Parse every run's `dallm fit` flags as `dallm fit` would, before anything is launched or printed.

    A flag `dallm fit` does not have (a misspelt grid key, `model.rnak`, or a typo after `--`) refuses the
    whole sweep: every run would fail at start. A value it refuses (`model.rank=0`) concerns that run
    alone, which fails by itself as any crashing run does; returned as {run name: the error line}.
    """
    from dallm.cli import build_parser
    from dallm.errors import one_line

    parser = build_parser()
    refused = {}
    for run, args in zip(runs, arg_lists, strict=True):
        try:
            parser.parse_args(args)
        except Exception as err:  # ArgumentError, or a config file that does not parse
            line = one_line(err)
            if any(words in str(err) for words in _UNKNOWN_FLAG):
                raise ValueError(
                    f"run {run.name}: `dallm fit` has no such flag (check --grid and the flags after --): {line}"
                ) from err
            refused[run.name] = line
    return refused


# ---------------------------------------------------------------------------------------- run state
def run_state(run_dir: Path) -> str:
    """ "done" (finished: skip), "resume" (has checkpoints/last.ckpt) or "new"."""
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
    write_record(
        run_dir, name=run.name, settings=dict(run.settings), seed=run.seed, args=args, status="pending"
    )
    return [*args, "--ckpt_path", "last"] if state == "resume" else list(args)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ---------------------------------------------------------------------------------------- the command
def sweep(
    config: str,
    grid: list[str] | None = None,
    grids: list[dict[str, list[Any]]] | None = None,
    seeds: list[Seed] = [0],  # noqa: B006 (jsonargparse needs a literal default)
    name: str | None = None,
    save_dir: str = "lightning_logs",
    launcher: str = "local",
    max_parallel: Count = 1,
    gpus_per_run: Count = 1,
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
        raise ValueError(
            f"--max_parallel and --gpus_per_run must be >= 1, got {max_parallel}, {gpus_per_run}"
        )
    if not Path(config).is_file():
        raise ValueError(f"--config {config}: no such file")
    all_grids = [dict(g) for g in grids or []]
    if grid:
        all_grids.append(dict(parse_grid_item(item) for item in grid))
    runs = expand(all_grids, seeds)
    name = name or f"sweep_{Path(config).stem}"
    root = Path(save_dir).resolve() / name
    refused = check_runs(runs, [fit_args(run, [config], Path(save_dir).resolve(), name, extra) for run in runs])
    to_launch, skipped = [], []
    for run in runs:
        args = fit_args(run, [config], Path(save_dir).resolve(), name, extra)
        run_dir = root / run.name
        if dry_run:
            state = f"refused by dallm fit: {refused[run.name]}" if run.name in refused else run_state(run_dir)
            print(f"{run.name} [{state}]: python -m dallm {' '.join(args)}")
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
    failed = sorted(n for n, c in codes.items() if c != 0)  # interrupted ones too: not done, resumable
    for n in failed:
        print(f"dallm sweep: {status_of(codes[n])}: {n} (see {root / n / RECORD})", file=sys.stderr)
    print(
        f"dallm sweep {name}: {len(codes) - len(failed)} finished now, {len(failed)} failed or interrupted, "
        f"{len(skipped)} skipped"
    )
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


def sweep_parser():
    """The `dallm sweep` parser, generated from `sweep`'s signature and docstring."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="dallm sweep", description=sweep.__doc__.split("\n\n")[0], **PARSER_KWARGS)
    parser.add_argument(
        "--sweep_file", action=ActionConfigFile, help="a YAML file with any of the flags below"
    )
    parser.add_function_arguments(sweep, as_group=False)
    return parser


def sweep_main(argv: list[str]) -> int:
    """`python -m dallm sweep ...` (see `sweep`); bad input: one line naming the flag, exit 2."""
    parser = sweep_parser()
    cfg = parser.parse_args(_normalise_argv(argv))
    import signal

    # scancel / kill send SIGTERM: stop the runs and record them as interrupted, as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    instantiate = (
        getattr(parser, "instantiate", None) or parser.instantiate_classes
    )  # renamed in jsonargparse 4.49
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
