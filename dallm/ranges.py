"""The valid range of every numeric flag, as its type: jsonargparse refuses a value out of range at parse time.

One rule for every command (fit, validate, teacher, kid, sample, export, sweep, report), written once here
and used in the signatures that are the `--help` texts:

| kind | type | 0 | -1 | nan / inf | huge |
|---|---|---|---|---|---|
| a count of things to make or use (steps, images, subsets, batch size, rank, nodes) | `Count` (int >= 1) | refused | refused | refused | accepted: it is the user's budget |
| a KID sample or subset size (KID compares pairs) | `AtLeastTwo` | refused | refused | refused | accepted (capped at the images there) |
| a count or cadence where 0 means "none" / "off" (`every_n_steps`, `num_val_images`, `num_workers`, retries) | `NonNegativeInt` | accepted (off) | refused | refused | accepted |
| a seed | `Seed` (0 .. 2^32-1, numpy's range, which Lightning's seed_everything enforces) | accepted | refused | refused | refused above 2^32-1 |
| a rate (learning rates, token lr) or a scale that must be positive (alpha, snr_gamma, timeouts) | `PositiveFinite` | refused | refused | refused | inf refused; a finite value accepted |
| a weight, an offset or a guidance scale (0 = off) | `NonNegativeFinite` | accepted (off) | refused | refused | inf refused |
| a probability in [0, 1) (dropout, held-out fraction) | `UnitIntervalOpenRight` | accepted | refused | refused | refused |
| a strength that may be negative (`dallm sample --lora_scale`) | `Finite` | accepted | accepted | refused | inf refused |
| a training resolution (multiple of 8, checked at construction) | `Resolution` (8 .. MAX_RESOLUTION) | refused | refused | refused | refused above MAX_RESOLUTION |

A float flag never takes nan or inf: they pass every `<`/`>` check written by hand and poison the
arithmetic that follows. A size with a structural bound has it: the LoRA rank is bounded by the target
layers' sizes (checked in `dallm.preflight` against the architecture, on the meta device), a resolution by
the largest image dallm decodes (`dallm.images.MAX_IMAGE_PIXELS`). Counts have no upper bound: asking for
many images or steps is a budget, and the plan (`dallm teacher`) or the progress bar shows its size.

jsonargparse returns values of these types as plain int/float (`_parse_to_plain`), so hyperparameters
and callback state stored in a checkpoint stay plain data (a checkpoint is loaded with
`weights_only=True`, which refuses unknown classes); `plain_numbers` does the same for a config that
holds restricted instances anyway.
"""

from __future__ import annotations

import math
from typing import Any

from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, register_type, restricted_number_type

from dallm.images import MAX_IMAGE_PIXELS

__all__ = [
    "Count",
    "NonNegativeInt",
    "UnitInterval",
    "Seed",
    "PositiveFinite",
    "NonNegativeFinite",
    "UnitIntervalOpenRight",
    "Finite",
    "Resolution",
    "AtLeastTwo",
    "FractionOfRun",
    "MAX_RESOLUTION",
    "MAX_SEED",
    "plain_numbers",
]

MAX_SEED = 2**32 - 1  # numpy's seed range, which lightning's seed_everything enforces
# The largest square image dallm decodes (MAX_IMAGE_PIXELS), rounded down to a multiple of 8.
MAX_RESOLUTION = int(math.isqrt(MAX_IMAGE_PIXELS)) // 8 * 8

Count = restricted_number_type("Count", int, [(">=", 1)])
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<=", MAX_SEED)])
PositiveFinite = restricted_number_type("PositiveFinite", float, [(">", 0), ("<", math.inf)])
NonNegativeFinite = restricted_number_type("NonNegativeFinite", float, [(">=", 0), ("<", math.inf)])
UnitIntervalOpenRight = restricted_number_type("UnitIntervalOpenRight", float, [(">=", 0), ("<", 1)])
Finite = restricted_number_type("Finite", float, [(">", -math.inf), ("<", math.inf)])
Resolution = restricted_number_type("Resolution", int, [(">=", 8), ("<=", MAX_RESOLUTION)])
# KID compares pairs: a sample or subset of one image has no pair.
AtLeastTwo = restricted_number_type("AtLeastTwo", int, [(">=", 2)])
# A fraction of the run (Lightning's float val_check_interval): (0, 1].
FractionOfRun = restricted_number_type("FractionOfRun", float, [(">", 0), ("<=", 1)])
UnitInterval = ClosedUnitInterval


def _parse_to_plain(kind) -> None:
    """Register `kind` so that jsonargparse returns a plain int/float after checking the range.

    Its own registration returns an instance of the restricted class, which is no plain data: a
    checkpoint holding one (hyperparameters, callback state) could not be loaded with weights_only=True,
    and the classes are made at run time, so no unpickler could find them.
    """

    def check(value, _kind, kind=kind) -> bool:
        if type(value) is not kind._type:
            return False
        try:
            kind._validation_fn(kind, value)
        except ValueError:
            return False
        return True

    register_type(kind, kind._type, lambda value, kind=kind: kind._type(kind(value)), type_check=check)


for _kind in (Count, NonNegativeInt, Seed, PositiveFinite, NonNegativeFinite, UnitIntervalOpenRight, Finite,
              Resolution, AtLeastTwo, FractionOfRun, UnitInterval):  # fmt: skip
    _parse_to_plain(_kind)


def plain_numbers(value: Any) -> Any:
    """`value` with every restricted int/float (and in Namespaces, dicts, lists) as a plain int/float.

    Namespaces and dicts are changed in place (LightningCLI instantiates from the same objects).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and type(value) is not int:
        return int(value)
    if isinstance(value, float) and type(value) is not float:
        return float(value)
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        for key, item in vars(value).items():
            setattr(value, key, plain_numbers(item))
        return value
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = plain_numbers(item)
        return value
    if isinstance(value, list):
        value[:] = [plain_numbers(v) for v in value]
        return value
    if isinstance(value, tuple):
        return tuple(plain_numbers(v) for v in value)
    return value
