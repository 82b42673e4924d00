"""The statistics of KID: the unbiased MMD² with KID's cubic kernel, its variance, and the variance of a
difference of two MMD² that share their real sample (the relative test). Pure functions of feature
tensors, float64, with leading batch dimensions carried through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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
