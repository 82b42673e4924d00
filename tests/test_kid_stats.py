"""KID's standard error and the relative KID test (dallm.measure.kid), checked against brute force.

Synthetic Gaussian features, many independent draws at once (the batched math carries leading
dimensions), so each check is a Monte Carlo of 1000 draws that runs in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch

from dallm.measure import mmd
from dallm.measure.kid import (
    kid_from_features,
    mmd2_difference_with_variance,
    mmd2_with_variance,
    relative_kid_test,
)

D = 8  # feature size: small, so draws are cheap; the estimator does not care
DRAWS = 1000


def gaussians(g: torch.Generator, draws: int, n: int, shift: float) -> torch.Tensor:
    """(draws, n, D) float64 samples of N(shift · 1, I)."""
    return torch.randn(draws, n, D, generator=g, dtype=torch.float64) + shift


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


# ------------------------------------------------------------------------------------- the value


def test_kid_mean_is_the_full_set_unbiased_mmd2_for_unequal_sizes():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(20, D, generator=g), torch.randn(100, D, generator=g) + 0.3
    r, f = real.double(), fake.double()

    def k(a, b):
        return (a @ b.T / D + 1) ** 3

    m, n = 20, 100
    brute = (k(r, r).sum() - k(r, r).diag().sum()) / (m * (m - 1))
    brute += (k(f, f).sum() - k(f, f).diag().sum()) / (n * (n - 1)) - 2 * k(r, f).mean()
    result = kid_from_features(real, fake)
    assert result.kid_mean == pytest.approx(float(brute), rel=1e-10)
    assert result.kid_std is not None  # subsets of 20 fakes differ: torchmetrics' spread is defined


def test_kid_estimate_is_unbiased_for_the_true_mmd2():
    # The true MMD² of N(0, I) vs N(0.3, I) under the cubic kernel, from 2000 a side.
    g = torch.Generator().manual_seed(1)
    truth, truth_var = mmd2_with_variance(gaussians(g, 1, 2000, 0.0)[0], gaussians(g, 1, 2000, 0.3)[0])
    small, _ = mmd2_with_variance(gaussians(g, DRAWS, 20, 0.0), gaussians(g, DRAWS, 20, 0.3))  # (DRAWS,)
    assert float(truth) > 0.1
    error = math.sqrt(float(small.var()) / DRAWS + float(truth_var))
    assert abs(float(small.mean()) - float(truth)) < 3 * error


# ---------------------------------------------------------------------------- the standard error


@pytest.mark.parametrize("n_real, n_fake", [(20, 20), (20, 100), (50, 50)])
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_kid_se_matches_the_spread_over_independent_draws(n_real, n_fake, shift):
    g = torch.Generator().manual_seed(n_real * 1000 + n_fake + int(shift * 10))
    kid, var = mmd2_with_variance(gaussians(g, DRAWS, n_real, 0.0), gaussians(g, DRAWS, n_fake, shift))
    se = var.sqrt()
    assert bool(torch.isfinite(se).all()) and bool((se > 0).all())  # never a 0 that would claim certainty
    ratio = float(se.mean() / kid.std())  # what a user sees vs what repeating the experiment gives
    # Measured: 0.94-0.98 with a shift; 1.13-1.16 at shift 0, where clipping the first-order part
    # (truly 0 there) at 0 makes the SE err on the conservative side.
    assert 0.8 < ratio < 1.2, ratio


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_kid_se_at_five_images_a_side_errs_on_the_safe_side(shift):
    g = torch.Generator().manual_seed(50 + int(shift * 10))
    kid, var = mmd2_with_variance(gaussians(g, 4 * DRAWS, 5, 0.0), gaussians(g, 4 * DRAWS, 5, shift))
    ratio = float(var.sqrt().mean() / kid.std())
    assert 0.9 < ratio < 1.3, ratio  # measured 1.19 (shift 0) and 1.06 (shift 0.3)


def test_kid_mean_equals_torchmetrics_on_equal_sizes():
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(7)
    real, fake = (
        torch.randn(30, D, generator=g, dtype=torch.float64),
        torch.randn(30, D, generator=g, dtype=torch.float64),
    )
    fake = fake * 1.2 + 0.1
    assert kid_from_features(real, fake).kid_mean == pytest.approx(float(poly_mmd(real, fake)), rel=1e-12)


def test_kid_from_features_reports_the_se_of_the_batched_math():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(20, D, generator=g), torch.randn(100, D, generator=g) + 0.2
    result = kid_from_features(real, fake)
    kid, var = mmd2_with_variance(real, fake)
    assert result.kid_se == pytest.approx(math.sqrt(float(var)), rel=1e-12)
    assert result.kid_mean == pytest.approx(float(kid), rel=1e-12)
    assert result.to_dict()["kid_se"] == result.kid_se


def test_kid_se_is_undefined_below_four_a_side():
    x = torch.randn(3, D)
    result = kid_from_features(x, torch.randn(10, D))
    assert result.kid_se is None and "kid_se needs at least 4" in result.note
    assert kid_from_features(torch.randn(4, D), torch.randn(4, D)).kid_se is not None


def test_chunked_kernel_sums_equal_the_whole_block(monkeypatch):
    g = torch.Generator().manual_seed(3)
    r, a, b = (torch.randn(n, D, generator=g, dtype=torch.float64) for n in (23, 17, 31))
    whole = mmd2_with_variance(r, a), mmd2_difference_with_variance(r, a, b)
    monkeypatch.setattr(mmd, "_CHUNK", 5)  # 23 rows in chunks of 5, last one short
    chunked = mmd2_with_variance(r, a), mmd2_difference_with_variance(r, a, b)
    for w, c in zip(whole, chunked, strict=True):
        assert torch.allclose(torch.stack(w), torch.stack(c), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- the relative test


def test_relative_test_finds_the_closer_model():
    g = torch.Generator().manual_seed(4)
    real, a, b = gaussians(g, DRAWS, 20, 0.0), gaussians(g, DRAWS, 20, 0.0), gaussians(g, DRAWS, 20, 0.6)
    diff, var = mmd2_difference_with_variance(real, a, b)
    p = normal_cdf(diff / var.sqrt())
    assert float((p < 0.05).double().mean()) > 0.75  # measured 0.86


@pytest.mark.parametrize("n_a, n_b, shift", [(20, 20, 0.3), (100, 20, 0.3), (20, 20, 0.0)])
def test_relative_test_is_calibrated_when_a_and_b_are_one_distribution(n_a, n_b, shift):
    # Both models equally far from REAL (shift 0.3), or both exactly REAL's distribution (shift 0).
    g = torch.Generator().manual_seed(5 + n_a)
    real = gaussians(g, DRAWS, 20, 0.0)
    diff, var = mmd2_difference_with_variance(
        real, gaussians(g, DRAWS, n_a, shift), gaussians(g, DRAWS, n_b, shift)
    )
    p = normal_cdf(diff / var.sqrt())
    false_positive = float((p < 0.05).double().mean())
    assert 0.015 <= false_positive <= 0.10, false_positive
    quartiles = torch.quantile(p, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert torch.allclose(quartiles, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), atol=0.06), (
        quartiles
    )


def test_relative_kid_test_result_is_consistent_and_antisymmetric():
    g = torch.Generator().manual_seed(6)
    real, a, b = (
        torch.randn(20, D, generator=g),
        torch.randn(50, D, generator=g),
        torch.randn(20, D, generator=g),
    )
    b = b + 0.5
    ab, ba = relative_kid_test(real, a, b), relative_kid_test(real, b, a)
    assert ab.kid_a == pytest.approx(kid_from_features(real, a).kid_mean, rel=1e-12)
    assert ab.kid_b_se == pytest.approx(kid_from_features(real, b).kid_se, rel=1e-12)
    assert ab.diff == pytest.approx(ab.kid_a - ab.kid_b, rel=1e-9) and ab.diff < 0
    assert ab.diff_se == pytest.approx(ba.diff_se, rel=1e-12) and ab.z == pytest.approx(-ba.z, rel=1e-12)
    assert ab.p_value + ba.p_value == pytest.approx(1.0, rel=1e-12) and ab.p_value < 0.05
    # The shared REAL sample makes the two estimates covary: the SE of the difference is not the
    # independent-samples one.
    assert ab.diff_se != pytest.approx(math.hypot(ab.kid_a_se, ab.kid_b_se), rel=1e-3)
    assert set(ab.to_dict()) >= {"kid_a", "kid_b", "diff", "diff_se", "z", "p_value"}


def test_relative_kid_test_without_se_gives_no_p_value():
    x = torch.randn(10, D)
    result = relative_kid_test(x, torch.randn(3, D), torch.randn(10, D))
    assert result.p_value is None and result.diff_se is None and "no p-value" in result.note
    with pytest.raises(ValueError, match="at least 2 B images"):
        relative_kid_test(x, x, x[:1])
    with pytest.raises(ValueError, match="differ in size"):
        relative_kid_test(x, x, torch.randn(10, D + 1))
