"""The relative tests of `dallm report`: which setting's samples are closer to the held-out teacher images.

It reads the instance-prompt row of each run's last KID round grid (the exact uint8 images the callback
scored), embeds them with the run's own `--kid.feature`, checks that KID recomputed from them matches the
logged `kid/val`, and runs the relative MMD test (Bounliphone et al. 2016) between every pair of a family.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dallm.sweep.run_files import grid_samples, last_grid, run_config


class Embedder:
    """Features of the held-out teacher images and of run samples, one extractor per --kid.feature."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._extractors: dict[tuple, Any] = {}
        self._teacher: dict[tuple, torch.Tensor] = {}

    def extractor(self, kid: dict):
        from dallm.measure.kid import build_feature_extractor

        key = (json.dumps(kid["feature"], sort_keys=True), kid.get("weights"))  # a class_path spec is a dict
        if key not in self._extractors:
            self._extractors[key] = build_feature_extractor(kid["feature"], kid.get("weights"), self.device)
        return self._extractors[key]

    def features(self, images: torch.Tensor, kid: dict) -> torch.Tensor:
        from dallm.measure.kid import features_of_images

        extractor = self.extractor(kid)
        return features_of_images(images, extractor, kid.get("feature_batch_size", 32)).float().cpu()

    def teacher(self, cfg: dict) -> torch.Tensor:
        """Features of the run's held-out teacher images, as the KID callback computes them."""
        from dallm.data.datamodule import DallmDataModule
        from dallm.measure.kid import images_to_tensor

        data = cfg["data"]
        dm = DallmDataModule(**data)
        key = (json.dumps(cfg["kid"]["feature"], sort_keys=True), tuple(map(str, dm.val_teacher_paths)))
        if key not in self._teacher:
            if len(dm.val_teacher_paths) < 2:
                raise ValueError(
                    f"--data.teacher_dir {data['teacher_dir']}: fewer than 2 held-out teacher images"
                )
            self._teacher[key] = self.features(images_to_tensor(dm.val_teacher_paths), cfg["kid"])
        return self._teacher[key]

    def run(self, run_dir: Path) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """(step, sample features, teacher features) of a run's last KID round, or None without grids."""
        found = last_grid(run_dir)
        if found is None:
            return None
        cfg = run_config(run_dir)
        images = grid_samples(found[1], cfg["data"]["resolution"], cfg["kid"]["num_samples"])
        return found[0], self.features(images, cfg["kid"]), self.teacher(cfg)


def relative_test(real: torch.Tensor, fake_a: torch.Tensor, fake_b: torch.Tensor) -> dict[str, Any]:
    """dallm.measure.kid.relative_kid_test as a dict (the relative MMD test of Bounliphone et al. 2016)."""
    from dataclasses import asdict, is_dataclass

    from dallm.measure.kid import relative_kid_test

    result = relative_kid_test(real, fake_a, fake_b)
    return asdict(result) if is_dataclass(result) else dict(result)


def _p_value(result: dict[str, Any]) -> float:
    for key in ("p_value", "p", "pvalue"):
        if key in result:
            return float("nan") if result[key] is None else float(result[key])
    raise KeyError(f"relative_kid_test returned no p-value: {sorted(result)}")



def relative_section(
    fams: list, stats: dict, summary: dict, device: str, label: Callable[[tuple], str]
) -> list[str]:
    """Markdown of the relative tests between every pair of settings of each family (`label`: a setting's name)."""
    from dallm.measure.kid import kid_from_features

    embed = Embedder(device)
    feats: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    check = []
    for key in {k for _, _, members in fams for k in members}:
        for run, curves in zip(stats[key]["runs"], stats[key]["curves"], strict=True):
            got = embed.run(run["dir"])
            if got is None:
                continue
            feats[run["name"]] = got
            logged = curves.get("kid/val", {}).get(got[0])
            if logged is not None:
                kid = run_config(run["dir"])["kid"]
                again = kid_from_features(
                    got[2], got[1], kid["subset_size"], kid["subsets"], kid.get("seed") or 0
                ).kid_mean
                check.append(abs(again - logged))
    lines = ["## Relative tests (last KID round, seeds pooled)", "",
             "Is setting A's model closer to the held-out teacher images than B's? The relative MMD test "
             "(Bounliphone et al. 2016) on the last round's samples of all seeds of each setting, against the "
             "held-out teacher features; p < 0.05: A is closer with 95% confidence. It covers the sampling "
             "noise of these images, not how another set of training seeds would come out: the per-seed p "
             "values show that.", ""]  # fmt: skip
    if check:
        lines += [f"Check: KID recomputed from the saved sample grids matches the logged `kid/val` of "
                  f"{len(check)} runs to within {max(check):.1e}.", ""]  # fmt: skip
        summary["recompute_max_abs_diff"] = max(check)
    import dallm.measure.kid

    if not hasattr(dallm.measure.kid, "relative_kid_test"):
        return [*lines, "Not run: this dallm has no `dallm.measure.kid.relative_kid_test`."]
    lines += [
        "| A | B | n per side | KID A | KID B | A - B ± se | p (A closer) | p (B closer) | per-seed p (A closer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _flag, _fixed, members in fams:
        for a, b in itertools.combinations(members, 2):
            runs_a = {r["seed"]: feats[r["name"]] for r in stats[a]["runs"] if r["name"] in feats}
            runs_b = {r["seed"]: feats[r["name"]] for r in stats[b]["runs"] if r["name"] in feats}
            if not runs_a or not runs_b:
                continue
            teacher = next(iter(runs_a.values()))[2]
            if any(not torch.equal(v[2], teacher) for v in [*runs_a.values(), *runs_b.values()]):
                continue  # different held-out sets: no common reference
            fa = torch.cat([v[1] for _, v in sorted(runs_a.items())])
            fb = torch.cat([v[1] for _, v in sorted(runs_b.items())])
            res = relative_test(teacher, fa, fb)
            per_seed = [f"{s}: {_p_value(relative_test(teacher, runs_a[s][1], runs_b[s][1])):.2f}"
                        for s in sorted(set(runs_a) & set(runs_b))]  # fmt: skip
            diff, se = res.get("diff", float("nan")), res.get("diff_se") or float("nan")
            summary["relative"].append({"a": label(a), "b": label(b), **res, "per_seed": per_seed})
            lines.append(
                f"| {label(a)} | {label(b)} | {fa.shape[0]} / {fb.shape[0]} vs {teacher.shape[0]} | "
                f"{res.get('kid_a', float('nan')):.4f} | {res.get('kid_b', float('nan')):.4f} | "
                f"{diff:.4f} ± {se:.4f} | {_p_value(res):.3f} | {1 - _p_value(res):.3f} | {', '.join(per_seed)} |"
            )
    return lines
