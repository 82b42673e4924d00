"""`dallm kid`: KID between image folders, or the relative KID test between two generated folders.

A command module: the library (callbacks, report) uses dallm.measure.kid, never this.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import torch

from dallm.errors import PARSER_KWARGS
from dallm.measure.kid import build_feature_extractor, check_kid_dirs, kid_of_dirs, relative_kid_of_dirs
from dallm.ranges import AtLeastTwo, Count, Seed


def kid(
    real_dir: str,
    fake_dir: str,
    fake_b_dir: str | None = None,
    feature: dict | str = "inception",
    weights: str | None = None,
    subset_size: AtLeastTwo = 1000,
    subsets: Count = 100,
    seed: Seed = 0,
    batch_size: Count = 32,
    device: str = "cpu",
) -> dict[str, Any]:
    """KID between image folders; prints one JSON object on stdout, progress on stderr.

    `dallm kid REAL_DIR FAKE_DIR`: KID (kid_mean, the unbiased MMD² over all pairs) with its standard
    error kid_se, which covers the draw of these images only: not the choice of sampling seeds, nor a
    different run. `dallm kid REAL_DIR FAKE_DIR FAKE_B_DIR`: the relative KID test (Bounliphone et al.
    2016): KID of each against REAL (kid_a, kid_b), diff = kid_a - kid_b with diff_se, and p_value, the
    one-sided p-value that FAKE_DIR (A) is closer to REAL_DIR than FAKE_B_DIR (B) is. Each image is
    decoded and resized on its own to the feature extractor's input. Bad input prints one line
    `dallm: error: ...` and exits with status 2.

    Args:
        real_dir: Directory of reference (teacher) images.
        fake_dir: Directory of generated images (A in the relative test).
        fake_b_dir: A second directory of generated images (B): runs the relative test A vs B.
        feature: Feature extractor: inception | clip:<hub id or local dir> | toy | {"class_path": "<package.module.Class>", "init_args": {...}}.
        weights: Inception weights file (default: $DALLM_INCEPTION_WEIGHTS, then torch's hub cache).
        subset_size: Images per KID subset for kid_std, capped at the smaller set.
        subsets: Number of random subsets for kid_std.
        seed: Seed of the subset draws.
        batch_size: Images per feature-extractor batch (and decoded at once).
        device: Device of the feature extractor: cpu, cuda, ...

    Returns:
        The JSON object printed: KIDResult's fields (or RelativeKIDResult's) and "feature".
    """
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")
    dirs = {"REAL_DIR": real_dir, "FAKE_DIR": fake_dir}
    if fake_b_dir is not None:
        dirs["FAKE_B_DIR"] = fake_b_dir
    check_kid_dirs(**dirs)  # before loading a model: bad paths fail in a second
    print(f"dallm kid: loading feature extractor {feature}", file=sys.stderr, flush=True)
    extractor = build_feature_extractor(feature, weights, str(dev))
    print(f"dallm kid: features of {', '.join(map(str, dirs.values()))}", file=sys.stderr, flush=True)
    if fake_b_dir is None:
        out = kid_of_dirs(real_dir, fake_dir, extractor, subset_size, subsets, seed, batch_size).to_dict()
    else:
        out = relative_kid_of_dirs(real_dir, fake_dir, fake_b_dir, extractor, batch_size).to_dict()
    note = out.pop("note")
    return {**out, "feature": extractor.name, "note": note}


def kid_parser():
    """The `dallm kid` parser, generated from `kid`'s signature and docstring (folders are positional)."""
    from docstring_parser import parse
    from jsonargparse import ArgumentParser

    doc = inspect.cleandoc(kid.__doc__ or "")
    params = {p.arg_name: p.description for p in parse(doc).params}
    parser = ArgumentParser(prog="dallm kid", description=doc.split("\nArgs:")[0].strip(), **PARSER_KWARGS)
    parser.add_argument("real_dir", type=str, help=params["real_dir"])
    parser.add_argument("fake_dir", type=str, help=params["fake_dir"])
    parser.add_argument("fake_b_dir", nargs="?", type=str | None, default=None, help=params["fake_b_dir"])
    parser.add_function_arguments(kid, as_group=False, skip={"real_dir", "fake_dir", "fake_b_dir"})
    return parser


def kid_main(argv: list[str]) -> int:
    """`dallm kid ...`: parse `argv`, run `kid`, print its JSON; errors become one line and status 2."""
    cfg = kid_parser().parse_args(argv)  # errors reach cli.main's boundary: one line, exit 2
    result = kid(**{k: v for k, v in cfg.as_dict().items() if k != "config"})
    print(json.dumps(result))
    return 0
