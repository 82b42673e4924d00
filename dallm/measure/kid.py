"""Distances between image sets: KID with its standard error, the relative KID test, and CMMD.

    image files ──dallm.measure.features──► features (N, D) ──► kid_from_features / relative_kid_test / cmmd_from_features

KID is the unbiased MMD² with the cubic polynomial kernel (x·y/D + 1)³ of Bińkowski et al. 2018, over
all pairs of the full sets (`kid_mean`; with equal sizes and one whole-set subset it is exactly
torchmetrics' and torch-fidelity's KID). `kid_se` is its standard error over draws of the two samples,
from the U-statistic variance (dallm.measure.mmd); it is defined from 4 images a side, equal sizes or not.
torchmetrics' `KernelInceptionDistance` still gives `kid_std`, the spread over random subsets, where
subsets differ. `relative_kid_test` is the relative MMD test of Bounliphone et al. 2016: which of two
generated sets is closer to the real one, with a one-sided p-value.

The `dallm kid` command over folders is dallm.measure.command.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.kid import KernelInceptionDistance

from dallm.images import list_images

# Re-exported: the KID callback, scripts and tests import the extractors from here.
from dallm.measure.feature_spec import FEATURE_FORMS, build_feature_extractor  # noqa: F401
from dallm.measure.features import (  # noqa: F401
    INCEPTION_ENV,
    INCEPTION_FILE,
    FeatureExtractor,
    features_of_dir,
    features_of_images,
    features_of_paths,
    images_to_tensor,
    resolve_inception_weights,
)
from dallm.measure.mmd import mmd2_difference_with_variance, mmd2_with_variance


@dataclass
class KIDResult:
    """KID between two feature sets, its standard error, and what it was computed from.

    `kid_mean` is the unbiased MMD² over all pairs of the full sets (for equal sizes with `subset_size`
    equal to both, exactly torchmetrics' / torch-fidelity's single-subset KID). `kid_se` is the standard
    error of that estimate over draws of the two samples (None below 4 images a side). `kid_std` is
    torchmetrics' spread over random subsets of `subset_size`: None when undefined (every subset is the
    whole set, or a single subset). `note` says why, and mentions a subset size capped at the smaller
    sample.
    """

    kid_mean: float
    kid_se: float | None
    kid_std: float | None
    n_real: int
    n_fake: int
    subset_size: int
    subsets: int
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RelativeKIDResult:
    """Which of two generated sets is closer to the real one (relative MMD test, Bounliphone et al. 2016).

    `diff` = `kid_a` - `kid_b` (negative: A is closer), `diff_se` its standard error with the covariance
    of the two estimates through the shared real images, `z` = diff / diff_se, and `p_value` = Φ(z), the
    one-sided p-value of "A is closer to REAL than B" (small: A is closer with that confidence).
    """

    kid_a: float
    kid_a_se: float | None
    kid_b: float
    kid_b_se: float | None
    diff: float
    diff_se: float | None
    z: float | None
    p_value: float | None
    n_real: int
    n_a: int
    n_b: int
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_features(sides: dict[str, Tensor]) -> None:
    sizes = set()
    for name, f in sides.items():
        if f.dim() != 2:
            raise ValueError(f"{name} features must be (N, D), got shape {tuple(f.shape)}")
        if f.shape[0] < 2:
            raise ValueError(f"KID needs at least 2 {name} images, got {f.shape[0]}")
        sizes.add(f.shape[1])
    if len(sizes) > 1:
        shapes = ", ".join(f"{k} {v.shape[1]}" for k, v in sides.items())
        raise ValueError(f"real and fake features differ in size: {shapes}")


def _se(var: Tensor) -> float | None:
    return None if torch.isnan(var) else math.sqrt(float(var))


SE_NOTE = "kid_se needs at least 4 images a side"


def kid_from_features(
    real: Tensor, fake: Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> KIDResult:
    """KID (unbiased MMD², kernel (x·y/D + 1)³) between `real` (N, D) and `fake` (M, D) features.

    `kid_mean` and `kid_se` use the full sets (see the section comment above). `kid_std` comes from
    torchmetrics' `KernelInceptionDistance` on `subsets` random subsets of `subset_size` (capped at
    min(N, M)), fed the features through an identity module. When the cap equals both N and M every
    subset is the whole set: none is drawn and `kid_std` is None. The subsets are drawn from a torch
    generator seeded with `seed` inside `torch.random.fork_rng`, so the result is reproducible and the
    caller's RNG state is left untouched.

    Raises:
        ValueError: for a side with fewer than 2 samples, mismatched feature sizes, `subset_size` < 2 or
            `subsets` < 1 (the messages name the `dallm kid` flags).
    """
    _check_features({"real": real, "fake": fake})
    if subset_size < 2:
        raise ValueError(
            f"--subset_size must be >= 2 (the unbiased MMD divides by m(m-1)), got {subset_size}"
        )
    if subsets < 1:
        raise ValueError(f"--subsets must be >= 1, got {subsets}")
    # float64 on the CPU: the unbiased estimate is a small difference of large cubic-kernel sums.
    real, fake = (t.detach().to("cpu", torch.float64) for t in (real, fake))
    n_real, n_fake = real.shape[0], fake.shape[0]
    mmd2, var = mmd2_with_variance(real, fake)
    size = min(subset_size, n_real, n_fake)
    notes = []
    if size < subset_size:
        notes.append(f"subset_size capped from {subset_size} to {size} (the smaller sample)")
    std = None
    if size == n_real == n_fake:
        subsets = 1  # every subset would be the whole set: its KID is kid_mean, with no spread
        notes.append("subset_size equals both sample sizes: every subset is the whole set, std undefined")
    elif subsets == 1:
        notes.append("a single subset: std undefined")
    else:
        with warnings.catch_warnings():
            # torchmetrics warns at construction that it keeps every feature: that is what we feed it.
            warnings.filterwarnings("ignore", message=r"Metric `Kernel Inception Distance` will save")
            metric = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=size)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        # torchmetrics draws subsets with the global torch.randperm: seed a forked CPU RNG, not the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            std = float(metric.compute()[1])
    if min(n_real, n_fake) < 4:
        notes.append(SE_NOTE)
    return KIDResult(
        kid_mean=float(mmd2),
        kid_se=_se(var),
        kid_std=std,
        n_real=n_real,
        n_fake=n_fake,
        subset_size=size,
        subsets=subsets,
        note="; ".join(notes) or None,
    )


def relative_kid_test(real: Tensor, fake_a: Tensor, fake_b: Tensor) -> RelativeKIDResult:
    """Is A closer to REAL than B? KID of each against `real` and the relative MMD test on their difference.

    Bounliphone et al. 2016 (ICLR), "A Test of Relative Similarity for Model Selection in Generative
    Models", as Bińkowski et al. 2018 use it to compare GANs: the two unbiased MMD² estimates share the
    real sample, so their difference has a variance with a covariance term (see
    `mmd2_difference_with_variance`); z = diff / diff_se is referred to the standard normal. Features
    (N, D), (Na, D), (Nb, D), any sizes >= 2 (>= 4 each for the SE and the p-value).
    """
    _check_features({"real": real, "A": fake_a, "B": fake_b})
    r, a, b = (t.detach().to("cpu", torch.float64) for t in (real, fake_a, fake_b))
    kid_a, var_a = mmd2_with_variance(r, a)
    kid_b, var_b = mmd2_with_variance(r, b)
    diff, var = mmd2_difference_with_variance(r, a, b)
    se = _se(var)
    z = p = None
    if se is not None:
        d = float(diff)
        z = d / se if se > 0 else (math.copysign(math.inf, d) if d != 0 else 0.0)
        p = 0.5 * math.erfc(-z / math.sqrt(2.0))  # Φ(z): small when A's KID is clearly below B's
    return RelativeKIDResult(
        kid_a=float(kid_a),
        kid_a_se=_se(var_a),
        kid_b=float(kid_b),
        kid_b_se=_se(var_b),
        diff=float(diff),
        diff_se=se,
        z=z,
        p_value=p,
        n_real=r.shape[0],
        n_a=a.shape[0],
        n_b=b.shape[0],
        note=None if se is not None else SE_NOTE + ": no p-value",
    )


def cmmd_from_features(real: Tensor, fake: Tensor, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD: RBF-kernel MMD² between L2-normalised CLIP embeddings (N, D) and (M, D).

    Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image Generation"
    (CVPR). As in the paper's reference implementation (google-research `cmmd/distance.py`): rows are
    L2-normalised, k(x, y) = exp(-γ‖x - y‖²) with γ = 1 / (2σ²), σ = 10, and the biased estimate

        CMMD = scale · (mean K_xx + mean K_yy - 2 · mean K_xy),   scale = 1000,

    where the means run over the full kernel matrices, diagonals included (so CMMD(X, X) = 0 exactly).
    """
    x = F.normalize(real.detach().to("cpu", torch.float64), dim=1)
    y = F.normalize(fake.detach().to("cpu", torch.float64), dim=1)
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a: Tensor, b: Tensor) -> Tensor:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T  # (len(a), len(b))
        return torch.exp(-gamma * d2).mean()

    return float(scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y)))


# ------------------------------------------------------------------------------------------ dirs


def check_kid_dirs(**dirs: str | Path) -> None:
    """Raise, naming the argument (REAL_DIR, FAKE_DIR, ...), unless every directory holds at least 2 images."""
    for flag, d in dirs.items():
        n = len(list_images(d, flag))
        if n < 2:
            raise ValueError(f"{flag}: KID needs at least 2 images, {d} has {n}")


def kid_of_dirs(
    real_dir: str | Path,
    fake_dir: str | Path,
    extractor: FeatureExtractor,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 0,
    batch_size: int = 32,
) -> KIDResult:
    """KID between the images of two directories (the work of `dallm kid REAL FAKE`)."""
    check_kid_dirs(REAL_DIR=real_dir, FAKE_DIR=fake_dir)  # a missing or small directory fails before decoding
    real = features_of_dir(real_dir, extractor, batch_size, "REAL_DIR")
    fake = features_of_dir(fake_dir, extractor, batch_size, "FAKE_DIR")
    return kid_from_features(real, fake, subset_size=subset_size, subsets=subsets, seed=seed)


def relative_kid_of_dirs(
    real_dir: str | Path,
    a_dir: str | Path,
    b_dir: str | Path,
    extractor: FeatureExtractor,
    batch_size: int = 32,
) -> RelativeKIDResult:
    """The relative KID test between the images of three directories (`dallm kid REAL FAKE_A FAKE_B`)."""
    check_kid_dirs(REAL_DIR=real_dir, FAKE_DIR=a_dir, FAKE_B_DIR=b_dir)
    real = features_of_dir(real_dir, extractor, batch_size, "REAL_DIR")
    a = features_of_dir(a_dir, extractor, batch_size, "FAKE_DIR")
    b = features_of_dir(b_dir, extractor, batch_size, "FAKE_B_DIR")
    return relative_kid_test(real, a, b)
