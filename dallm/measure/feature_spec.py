"""A `--kid.feature` spec: its forms, its check before any work, and the feature extractor it names.

The forms are a name (`inception`, `clip:<hub id or dir>`, `toy`) or jsonargparse's class_path with its
init_args for any nn.Module mapping [0, 1] images (N, 3, H, W) to (N, D) features; the extractors themselves
and each image's preparation are in `dallm.measure.features`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dallm.measure.features import (
    ClipFeatures,
    FeatureExtractor,
    InceptionFeatures,
    ModuleFeatures,
    resolve_inception_weights,
)

FEATURE_FORMS = "inception | clip:<hub id or local dir> | toy | {class_path: <package.module.Class>, init_args: {...}}"
# Feature names of earlier versions that a recorded resume contract may hold, as the class_path they meant.
LEGACY_FEATURES = {"module:dallm.tiny:feature_net": {"class_path": "dallm.arch.tiny.TinyFeatureNet", "init_args": {}}}
# A `--kid.feature`: a name (str) or a class_path with its init_args (dict).
FeatureSpec = dict[str, Any] | str  # dict first: jsonargparse tries the union in order


def canonical_feature(spec: Any) -> FeatureSpec:
    """A feature spec as comparable data: a name, or {"class_path", "init_args"} (an earlier version's name
    for the same net mapped to its class_path)."""
    if hasattr(spec, "as_dict"):
        spec = spec.as_dict()
    if isinstance(spec, dict):
        return {"class_path": spec.get("class_path"), "init_args": dict(spec.get("init_args") or {})}
    return LEGACY_FEATURES.get(spec, spec)


def feature_name(spec: FeatureSpec) -> str:
    """The short name of a feature spec: the name itself, or the class_path."""
    spec = canonical_feature(spec)
    return spec if isinstance(spec, str) else str(spec["class_path"])


def _feature_class(spec: dict) -> tuple[type[nn.Module], dict]:
    """The nn.Module class of a class_path spec and its init_args, checked against its signature."""
    import inspect

    from jsonargparse._util import import_object

    extra = set(spec) - {"class_path", "init_args"}
    path, init_args = spec.get("class_path"), spec.get("init_args") or {}
    if extra or not isinstance(path, str) or not isinstance(init_args, dict):
        raise ValueError(f"--feature: expected {{class_path: <package.module.Class>, init_args: {{...}}}}, got {spec}")
    try:
        cls = import_object(path)
    except Exception as err:
        raise ValueError(f"--feature {path}: cannot import it: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"--feature {path}: not an nn.Module class")
    try:
        inspect.signature(cls).bind(**init_args)
    except TypeError as err:
        raise ValueError(f"--feature {path}: init_args {init_args}: {err}") from err
    return cls, dict(init_args)


def check_feature_spec(spec: FeatureSpec, weights: str | None = None) -> None:
    """Refuse what `build_feature_extractor` would refuse, without building a network or reading weights.

    The form of `spec`, a class_path's import and init_args, and a given weights file's existence.
    """
    spec = canonical_feature(spec)
    if weights is not None and spec != "inception":
        raise ValueError(f"--weights is only for --feature inception, not {feature_name(spec)}")
    if spec == "inception":
        if weights is not None and not Path(weights).is_file():
            raise ValueError(f"--weights {weights}: no such file")
    elif isinstance(spec, dict):
        _feature_class(spec)
    elif not (spec == "toy" or (spec.startswith("clip:") and spec[5:])):
        raise ValueError(f"--feature: unknown feature {spec!r}; valid forms: {FEATURE_FORMS}")


def build_feature_extractor(spec: FeatureSpec, weights: str | None = None, device: str = "cpu") -> FeatureExtractor:
    """The feature extractor named by `spec` (see the module docstring), in eval mode on `device`.

    `weights` is the Inception weights file (`--weights`); other specs must not be given one.
    """
    spec = canonical_feature(spec)
    if weights is not None and spec != "inception":
        raise ValueError(f"--weights is only for --feature inception, not {feature_name(spec)}")
    if spec == "inception":
        extractor: FeatureExtractor = InceptionFeatures(resolve_inception_weights(weights))
    elif isinstance(spec, dict):
        cls, init_args = _feature_class(spec)
        try:
            net = cls(**init_args)
        except TypeError as err:  # a signature of *args, **kwargs (nn.Module's own) binds anything
            raise ValueError(f"--feature {spec['class_path']}: init_args {init_args}: {err}") from err
        extractor = ModuleFeatures(net, feature_name(spec))
    elif spec.startswith("clip:") and spec[5:]:
        extractor = ClipFeatures(spec[5:])
    elif spec == "toy":
        from dallm.toy.features import load_feature_net
        from dallm.toy.world import SIZE

        extractor = ModuleFeatures(load_feature_net(), "toy", input_size=SIZE)  # the toy world's images
    else:
        raise ValueError(f"--feature: unknown feature {spec!r}; valid forms: {FEATURE_FORMS}")
    return extractor.to(device).eval()
