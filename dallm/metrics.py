"""Distances between image sets: KID (through torchmetrics) and CMMD, on pluggable image features.

    images in [0, 1] (N, 3, H, W) ──FeatureExtractor──► features (N, D) ──► kid_from_features / cmmd_from_features

Feature extractors (`build_feature_extractor(spec)`, the `--feature` flag of `dallm kid`):

    inception              torch-fidelity's Inception-v3 2048-d pool features (the KID of the literature)
    clip:<hub id | dir>    CLIP image embeddings (`image_embeds` of CLIPVisionModelWithProjection)
    toy                    the toy world's feature net (shipped with the toy world, dallm/toy)
    module:<pkg.mod:fn>    fn() -> nn.Module mapping [0, 1] images (N, 3, H, W) to (N, D)

KID is computed by torchmetrics' `KernelInceptionDistance` with an identity "feature network", so the
estimator (unbiased MMD² with the cubic polynomial kernel, averaged over random subsets) is the
library's, while the features come from whichever extractor the user picked. The subset size is capped
at the smaller sample, so KID on 5-50 images neither crashes nor reports a meaningless std of 0.

`python -m dallm kid REAL_DIR FAKE_DIR` (`kid_main`) prints one JSON object with the result.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image.kid import KernelInceptionDistance

from dallm.data import list_images, load_rgb

FEATURE_FORMS = "inception | clip:<hub id or local dir> | toy | module:<package.module:callable>"

# torch-fidelity's Inception-v3 (TF 2015-12-05 weights converted to PyTorch), as in its own URL_INCEPTION_V3.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
INCEPTION_ENV = "DALLM_INCEPTION_WEIGHTS"

# OpenAI CLIP's normalisation, used when a model directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------- KID
#
# KID is the unbiased MMD² with the kernel k(x, y) = (x·y / D + 1)³, a sum of three U-statistics:
#
#     MMD²_u = U_rr + U_ff - 2 U_rf,   U_rr = Σ_{i≠j} k(r_i, r_j) / (m(m-1)),   U_rf = Σ_{i,j} k(r_i, f_j) / (mn).
#
# Its exact variance follows from the Hoeffding decomposition (Bińkowski et al. 2018, appendix;
# Sutherland et al. 2017 for m = n): a first-order part (4/m) Var_r(h_rr(r) - h_rf(r)) + (4/n) Var_f(...),
# with h_rf(r) = E_f k(r, f), which vanishes when real and fake have one distribution, and a
# second-order part 2 E k̃_rr² / (m(m-1)) + 4 E k̃_rf² / (mn) + 2 E k̃_ff² / (n(n-1)), k̃ the kernel
# centred in both arguments. Every kernel moment in it is estimated by a U-statistic over distinct
# indices (unbiased at any m, n >= 4, equal or not). Each part is a variance, so each estimate is
# clipped at 0: near MMD² = 0 the first-order estimate scatters around 0, and its positive part makes
# the SE err on the safe side there (about +15% at n = 20, measured in tests/test_kid_stats.py).
# All of it reduces to row/column sums of kernel blocks, accumulated over row chunks (memory
# O(chunk · n)); leading batch dimensions are carried through, so a test can run many draws at once.

_CHUNK = 2048  # rows of a kernel block held at once


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's kernel (a·b / D + 1)³, as torchmetrics' and torch-fidelity's: (..., len(a), len(b))."""
    return (a @ b.transpose(-1, -2) / a.shape[-1] + 1.0) ** 3


@dataclass(frozen=True)
class _Within:
    """Sums of the kernel block of one sample (..., m, D) with itself, diagonal excluded."""

    row: Tensor  # (..., m) R_i = Σ_{j≠i} k(x_i, x_j)
    sq: Tensor  # (...) Σ_{i≠j} k(x_i, x_j)²

    @property
    def m(self) -> int:
        return self.row.shape[-1]

    def mean(self) -> Tensor:
        return self.row.sum(-1) / (self.m * (self.m - 1))

    def moments(self) -> tuple[Tensor, Tensor]:
        """(ζ1 = Var_x E_x' k(x, x'), E k̃(x, x')²), unbiased."""
        m, s, q = self.m, self.row.sum(-1), self.sq
        path = (self.row**2).sum(-1) - q  # Σ over distinct i, j, l of k(x_i, x_j) k(x_i, x_l)
        four = s * s - 2 * q - 4 * path  # Σ over distinct i, j, k, l of k(x_i, x_j) k(x_k, x_l)
        mu2 = four / (m * (m - 1) * (m - 2) * (m - 3))
        zeta1 = path / (m * (m - 1) * (m - 2)) - mu2
        zeta2 = q / (m * (m - 1)) - mu2  # Var k(x, x')
        return zeta1, zeta2 - 2 * zeta1


@dataclass(frozen=True)
class _Between:
    """Sums of the kernel block between two samples (..., m, D) and (..., n, D)."""

    row: Tensor  # (..., m) Σ_j k(x_i, y_j)
    col: Tensor  # (..., n) Σ_i k(x_i, y_j)
    sq: Tensor  # (...) Σ_{i,j} k(x_i, y_j)²

    def mean(self) -> Tensor:
        return self.row.sum(-1) / (self.row.shape[-1] * self.col.shape[-1])

    def moments(self) -> tuple[Tensor, Tensor, Tensor]:
        """(Var_x E_y k(x, y), Var_y E_x k(x, y), E k̃(x, y)²), unbiased."""
        m, n, s, q = self.row.shape[-1], self.col.shape[-1], self.row.sum(-1), self.sq
        rr, cc = (self.row**2).sum(-1), (self.col**2).sum(-1)
        mu2 = (s * s - rr - cc + q) / (m * (m - 1) * n * (n - 1))
        z_row = (rr - q) / (m * n * (n - 1)) - mu2
        z_col = (cc - q) / (m * (m - 1) * n) - mu2
        z_k = q / (m * n) - mu2  # Var k(x, y)
        return z_row, z_col, z_k - z_row - z_col


def _cov_shared(w: _Within, sums: Tensor, n: int) -> Tensor:
    """Cov_x(E_x' k(x, x'), E_y k(x, y)), unbiased; `sums` (..., m) are Σ_y k(x_i, y) over n y's."""
    m = w.m
    shared = (w.row * sums).sum(-1)
    rest = w.row.sum(-1) * sums.sum(-1) - 2 * shared  # Σ over distinct i, j, l and any y
    return shared / (m * (m - 1) * n) - rest / (m * (m - 1) * (m - 2) * n)


def _cov_rows(a: _Between, b: _Between) -> Tensor:
    """Cov_r(E_a k(r, a), E_b k(r, b)) of two blocks sharing their rows r, unbiased."""
    m, na, nb = a.row.shape[-1], a.col.shape[-1], b.col.shape[-1]
    shared = (a.row * b.row).sum(-1)
    rest = a.row.sum(-1) * b.row.sum(-1) - shared
    return shared / (m * na * nb) - rest / (m * (m - 1) * na * nb)


def _within(x: Tensor) -> _Within:
    m = x.shape[-2]
    row, sq = x.new_zeros(x.shape[:-1]), x.new_zeros(x.shape[:-2])
    for i in range(0, m, _CHUNK):
        k = _poly_kernel(x[..., i : i + _CHUNK, :], x)  # (..., chunk, m)
        c = k.shape[-2]
        k[..., torch.arange(c), torch.arange(i, i + c)] = 0.0  # drop k(x_i, x_i)
        row[..., i : i + c] = k.sum(-1)
        sq += (k * k).sum((-1, -2))
    return _Within(row, sq)


def _between(x: Tensor, y: Tensor) -> _Between:
    row, col, sq = x.new_zeros(x.shape[:-1]), y.new_zeros(y.shape[:-1]), x.new_zeros(x.shape[:-2])
    for i in range(0, x.shape[-2], _CHUNK):
        k = _poly_kernel(x[..., i : i + _CHUNK, :], y)  # (..., chunk, n)
        row[..., i : i + k.shape[-2]] = k.sum(-1)
        col += k.sum(-2)
        sq += (k * k).sum((-1, -2))
    return _Between(row, col, sq)


def _pos(t: Tensor) -> Tensor:
    return t.clamp(min=0.0)


def mmd2_with_variance(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """Unbiased MMD² with KID's kernel, and the estimate of its variance, for real (..., m, D), fake (..., n, D).

    Float64 throughout; leading dimensions are batch dimensions (independent draws). The variance needs
    m, n >= 4 (it is NaN below). Returns (mmd2 (...), var (...)).
    """
    r, f = real.to(torch.float64), fake.to(torch.float64)
    m, n = r.shape[-2], f.shape[-2]
    rr, ff, rf = _within(r), _within(f), _between(r, f)
    mmd2 = rr.mean() + ff.mean() - 2 * rf.mean()
    if min(m, n) < 4:
        return mmd2, torch.full_like(mmd2, float("nan"))
    z_r, d_r = rr.moments()
    z_f, d_f = ff.moments()
    z_row, z_col, d_rf = rf.moments()
    first = 4 * (z_r + z_row - 2 * _cov_shared(rr, rf.row, n)) / m  # (4/m) Var_r(h_rr(r) - h_rf(r))
    first = first + 4 * (z_f + z_col - 2 * _cov_shared(ff, rf.col, m)) / n
    second = 2 * _pos(d_r) / (m * (m - 1)) + 4 * _pos(d_rf) / (m * n) + 2 * _pos(d_f) / (n * (n - 1))
    return mmd2, second + _pos(first)


def mmd2_difference_with_variance(real: Tensor, fake_a: Tensor, fake_b: Tensor) -> tuple[Tensor, Tensor]:
    """MMD²_u(real, a) - MMD²_u(real, b) and the estimate of its variance (Bounliphone et al. 2016).

    The two statistics share `real`: U_rr cancels from the difference and the covariance of U_ra and U_rb
    through the shared real samples enters the first-order part, (4/m) Var_r(h_ra(r) - h_rb(r)).
    Shapes (..., m, D), (..., na, D), (..., nb, D); every side needs >= 4 samples (else NaN variance).
    """
    r, a, b = (t.to(torch.float64) for t in (real, fake_a, fake_b))
    m, na, nb = r.shape[-2], a.shape[-2], b.shape[-2]
    aa, bb, ra, rb = _within(a), _within(b), _between(r, a), _between(r, b)
    diff = (aa.mean() - 2 * ra.mean()) - (bb.mean() - 2 * rb.mean())
    if min(m, na, nb) < 4:
        return diff, torch.full_like(diff, float("nan"))
    z_a, d_a = aa.moments()
    z_b, d_b = bb.moments()
    za_row, za_col, d_ra = ra.moments()
    zb_row, zb_col, d_rb = rb.moments()
    first = 4 * (za_row + zb_row - 2 * _cov_rows(ra, rb)) / m
    first = first + 4 * (z_a + za_col - 2 * _cov_shared(aa, ra.col, m)) / na
    first = first + 4 * (z_b + zb_col - 2 * _cov_shared(bb, rb.col, m)) / nb
    second = 2 * _pos(d_a) / (na * (na - 1)) + 4 * _pos(d_ra) / (m * na)
    second = second + 2 * _pos(d_b) / (nb * (nb - 1)) + 4 * _pos(d_rb) / (m * nb)
    return diff, second + _pos(first)


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


# ------------------------------------------------------------------------------ feature extractors


class FeatureExtractor(nn.Module):
    """Maps float images in [0, 1], (N, 3, H, W) with any H, W, to (N, D) float32 features.

    Subclasses implement `extract`; `forward` runs it without gradients. `name` identifies the features
    in logs and in `dallm kid`'s output.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    @property
    def device(self) -> torch.device:
        """The device of the first parameter or buffer (the CPU for a parameter-free extractor)."""
        t = next(iter(list(self.parameters()) + list(self.buffers())), None)
        return t.device if t is not None else torch.device("cpu")

    def extract(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (N, 3, H, W), got shape {tuple(images.shape)}")
        return self.extract(images.to(self.device, torch.float32)).float()


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's Inception-v3 (`inception-v3-compat`), 2048-d pool features."""

    def __init__(self, weights_path: str) -> None:
        super().__init__("inception")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )

    def extract(self, images: Tensor) -> Tensor:
        # The TF graph this mirrors takes 8-bit images and resizes them to 299x299 itself.
        uint8 = (images * 255.0).round().clamp(0, 255).to(torch.uint8)
        return self.net(uint8)[0]  # (N, 2048)


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_inception_weights(weights: str | None = None) -> str:
    """Path of the Inception-v3 weights: `weights`, else $DALLM_INCEPTION_WEIGHTS, else torch's hub cache.

    A missing cache file is downloaded when online (30 s socket timeout), never when HF_HUB_OFFLINE or
    TRANSFORMERS_OFFLINE is set, so an offline machine fails at once with a message naming the file.
    """
    for source, value in (("--weights", weights), (INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if value:
            if not Path(value).is_file():
                raise FileNotFoundError(f"{source}: Inception weights file {value} does not exist")
            return value
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return str(cached)
    need = (
        f"--feature inception needs the Inception-v3 weights file {INCEPTION_FILE} ({INCEPTION_URL}): "
        f"download it and pass --weights PATH or set {INCEPTION_ENV}=PATH (or put it at {cached})"
    )
    if _offline():
        raise FileNotFoundError(f"{need}; offline (HF_HUB_OFFLINE), so it is not downloaded")
    cached.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # torch.hub's urlopen has no timeout of its own: a dead network would hang
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
    except Exception as err:  # URLError, timeouts, HTTP errors: all mean "get the file yourself"
        raise FileNotFoundError(f"{need}; the download failed: {err}") from err
    finally:
        socket.setdefaulttimeout(previous)
    return str(cached)


def _clip_preprocessor_stats(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the model's preprocessor_config.json (a local dir or the hub cache), else CLIP's."""
    path: Path | None = Path(source) / "preprocessor_config.json"
    if not Path(source).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "preprocessor_config.json"))
        except Exception:  # no such file, or offline without it in the cache: standard CLIP stats
            path = None
    if path is None or not path.is_file():
        return CLIP_MEAN, CLIP_STD
    cfg = json.loads(path.read_text())
    return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


class ClipFeatures(FeatureExtractor):
    """`image_embeds` of a transformers CLIPVisionModelWithProjection, with CLIP's preprocessing in torch."""

    def __init__(self, source: str) -> None:
        super().__init__(f"clip:{source}")
        from transformers import CLIPVisionModelWithProjection

        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ValueError(f"--feature clip:{source}: cannot load a CLIP vision model: {err}") from err
        self.model.eval()
        self.image_size = int(self.model.config.image_size)
        mean, std = _clip_preprocessor_stats(source)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Shortest side -> image_size (bicubic, antialiased), centre crop, normalise: (N, 3, S, S)."""
        s = self.image_size
        h, w = images.shape[-2:]
        scale = s / min(h, w)
        size = (max(s, round(h * scale)), max(s, round(w * scale)))
        if size != (h, w):
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
            images = images.clamp(0.0, 1.0)  # bicubic overshoots; the PIL path CLIP was trained with clips
        top, left = (size[0] - s) // 2, (size[1] - s) // 2
        images = images[..., top : top + s, left : left + s]
        return (images - self.mean) / self.std

    def extract(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=self.preprocess(images)).image_embeds  # (N, projection_dim)


class ModuleFeatures(FeatureExtractor):
    """A user's nn.Module mapping [0, 1] images to (N, D); its output shape is checked on every call."""

    def __init__(self, net: nn.Module, name: str) -> None:
        super().__init__(name)
        if not isinstance(net, nn.Module):
            raise ValueError(f"--feature {name}: expected an nn.Module, got {type(net).__name__}")
        self.net = net.eval()

    def extract(self, images: Tensor) -> Tensor:
        out = self.net(images)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"--feature {self.name}: the module must map images (N, 3, H, W) to features (N, D); "
                f"for N={images.shape[0]} it returned {got}"
            )
        return out


def _load_toy_feature_net() -> nn.Module:
    """The toy world's feature net (dallm/toy/features.py, weights in the package's toy assets)."""
    from dallm.toy.features import load_feature_net

    return load_feature_net()


def _import_callable(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--feature module:{target}: expected module:<package.module:callable>")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--feature module:{target}: cannot import {module_name}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--feature module:{target}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--feature module:{target}: {attr} is not callable")
    return obj


def build_feature_extractor(spec: str, weights: str | None = None, device: str = "cpu") -> FeatureExtractor:
    """The feature extractor named by `spec` (see the module docstring), in eval mode on `device`.

    `weights` is the Inception weights file (`--weights`); other specs must not be given one.
    """
    if weights is not None and spec != "inception":
        raise ValueError(f"--weights is only for --feature inception, not {spec}")
    if spec == "inception":
        extractor: FeatureExtractor = InceptionFeatures(resolve_inception_weights(weights))
    elif spec.startswith("clip:") and spec[5:]:
        extractor = ClipFeatures(spec[5:])
    elif spec == "toy":
        extractor = ModuleFeatures(_load_toy_feature_net(), "toy")
    elif spec.startswith("module:") and spec[7:]:
        extractor = ModuleFeatures(_import_callable(spec[7:])(), spec)
    else:
        raise ValueError(f"--feature: unknown feature {spec!r}; valid forms: {FEATURE_FORMS}")
    return extractor.to(device).eval()


# ----------------------------------------------------------------------------------------- helpers


def _stack(images: Sequence[Image.Image], size: int | tuple[int, int] | None) -> Tensor:
    """RGB PIL images -> (N, 3, H, W) float in [0, 1]; resized (bicubic) to `size` or the first's size."""
    if isinstance(size, int):
        size = (size, size)
    h, w = size if size is not None else (images[0].height, images[0].width)
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if (im.height, im.width) != (h, w):
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        arrays.append(torch.from_numpy(np.array(im, dtype=np.uint8)))  # (H, W, 3)
    return torch.stack(arrays).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)


def images_to_tensor(paths: Sequence[str | Path], size: int | tuple[int, int] | None = None) -> Tensor:
    """Decode image files into (N, 3, H, W) floats in [0, 1].

    Images of different sizes are resized to `size` ((H, W) or a square side) or else to the first
    image's size, so they stack; the extractors resize to their own input size anyway.

    Raises:
        ValueError: naming a corrupt or unreadable file.
    """
    if not paths:
        raise ValueError("images_to_tensor: no image paths given")
    return _stack([load_rgb(p) for p in paths], size)


def features_of_images(
    images: Sequence[Image.Image] | Tensor, extractor: FeatureExtractor, batch_size: int = 32
) -> Tensor:
    """Features (N, D) float32 on the CPU of PIL images or an (N, 3, H, W) tensor in [0, 1], in batches."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    extractor.eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        batch = chunk if isinstance(chunk, Tensor) else _stack(list(chunk), None)
        out.append(extractor(batch).cpu())
    if not out:
        raise ValueError("features_of_images: no images given")
    return torch.cat(out)


def features_of_dir(
    directory: str | Path, extractor: FeatureExtractor, batch_size: int = 32, flag: str = "directory"
) -> Tensor:
    """Features (N, D) of the images directly inside `directory`, decoded one batch at a time.

    `flag` names the directory's CLI flag or argument in errors (missing, empty, corrupt file).
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    paths = list_images(directory, flag)
    return torch.cat(
        [
            features_of_images(images_to_tensor(paths[i : i + batch_size]), extractor, batch_size)
            for i in range(0, len(paths), batch_size)
        ]
    )


def check_kid_dirs(real_dir: str | Path, fake_dir: str | Path) -> None:
    """Raise, naming REAL_DIR / FAKE_DIR, unless both directories hold at least 2 images."""
    for flag, d in (("REAL_DIR", real_dir), ("FAKE_DIR", fake_dir)):
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
    """KID between the images of two directories (the work of `dallm kid`)."""
    check_kid_dirs(real_dir, fake_dir)  # a missing or too-small directory fails before any decoding
    real = features_of_dir(real_dir, extractor, batch_size, "REAL_DIR")
    fake = features_of_dir(fake_dir, extractor, batch_size, "FAKE_DIR")
    return kid_from_features(real, fake, subset_size=subset_size, subsets=subsets, seed=seed)


# --------------------------------------------------------------------------------------------- CLI


def _kid_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="dallm kid",
        description="KID between two image folders; prints one JSON object on stdout.",
    )
    parser.add_argument("real_dir", type=str, help="Directory of reference (teacher) images.")
    parser.add_argument("fake_dir", type=str, help="Directory of generated images.")
    parser.add_argument(
        "--feature", type=str, default="inception", help=f"Feature extractor: {FEATURE_FORMS}."
    )
    parser.add_argument(
        "--weights",
        type=str | None,
        default=None,
        help=f"Inception weights file {INCEPTION_FILE} (default: ${INCEPTION_ENV}, then torch's hub cache).",
    )
    parser.add_argument(
        "--subset_size", type=int, default=1000, help="Images per KID subset; capped at the smaller set."
    )
    parser.add_argument("--subsets", type=int, default=100, help="Number of random subsets (mean and std).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the subset draws.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per feature-extractor batch.")
    parser.add_argument(
        "--device", type=str, default="cpu", help="Device of the feature extractor: cpu, cuda, ..."
    )
    return parser


def kid_main(argv: list[str]) -> int:
    """`dallm kid REAL_DIR FAKE_DIR [...]`: one JSON object on stdout, progress on stderr; returns 0.

    Bad input (missing or empty directory, corrupt image, unknown feature, too few images, missing
    weights) prints one line `dallm kid: error: ...` on stderr and returns 2.
    """
    cfg = _kid_parser().parse_args(argv)  # usage errors: jsonargparse prints them and exits 2
    try:
        for flag in ("subsets", "batch_size"):
            if cfg[flag] < 1:
                raise ValueError(f"--{flag} must be >= 1, got {cfg[flag]}")
        if cfg.subset_size < 2:
            raise ValueError(f"--subset_size must be >= 2, got {cfg.subset_size}")
        try:
            device = torch.device(cfg.device)
        except RuntimeError as err:
            raise ValueError(f"--device: {err}") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available")
        check_kid_dirs(cfg.real_dir, cfg.fake_dir)  # before loading a model: bad paths fail in a second
        print(f"dallm kid: loading feature extractor {cfg.feature}", file=sys.stderr, flush=True)
        extractor = build_feature_extractor(cfg.feature, cfg.weights, str(device))
        print(f"dallm kid: features of {cfg.real_dir} and {cfg.fake_dir}", file=sys.stderr, flush=True)
        result = kid_of_dirs(
            cfg.real_dir, cfg.fake_dir, extractor, cfg.subset_size, cfg.subsets, cfg.seed, cfg.batch_size
        )
    except (ValueError, OSError) as err:  # OSError covers FileNotFoundError / NotADirectoryError
        if os.environ.get("DALLM_TRACEBACK"):
            raise
        message = " ".join(str(err).split())  # one line, whatever the library's message looked like
        print(f"dallm kid: error: {message}", file=sys.stderr)
        return 2
    out = result.to_dict()
    note = out.pop("note")
    print(json.dumps({**out, "feature": extractor.name, "note": note}))
    return 0
