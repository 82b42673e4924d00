"""Print the Monte Carlo figures behind tests/test_kid_stats.py: kid_se vs the spread of KID, and the
relative test's power and false-positive rate, on synthetic Gaussian features (same seeds as the tests).

    PYTHONPATH=. python scripts/kid_stats_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kid_stats import DRAWS, gaussians, normal_cdf  # noqa: E402

from dallm.measure.mmd import mmd2_difference_with_variance, mmd2_with_variance  # noqa: E402

for n_real, n_fake in [(20, 20), (20, 100), (50, 50)]:
    for shift in (0.0, 0.3):
        g = torch.Generator().manual_seed(n_real * 1000 + n_fake + int(shift * 10))
        kid, var = mmd2_with_variance(gaussians(g, DRAWS, n_real, 0.0), gaussians(g, DRAWS, n_fake, shift))
        print(
            f"kid_se  n_real={n_real:3d} n_fake={n_fake:3d} shift={shift}: "
            f"mean(kid_se)/std(KID over {DRAWS} draws) = {float(var.sqrt().mean() / kid.std()):.3f}"
        )
g = torch.Generator().manual_seed(4)
real, a, b = gaussians(g, DRAWS, 20, 0.0), gaussians(g, DRAWS, 20, 0.0), gaussians(g, DRAWS, 20, 0.6)
diff, var = mmd2_difference_with_variance(real, a, b)
p = normal_cdf(diff / var.sqrt())
print(
    f"relative test, A = REAL's distribution, B shifted 0.6, 20 a side: P(p < 0.05) = {float((p < 0.05).double().mean()):.3f}"
)
for n_a, n_b, shift in [(20, 20, 0.3), (100, 20, 0.3), (20, 20, 0.0)]:
    g = torch.Generator().manual_seed(5 + n_a)
    real = gaussians(g, DRAWS, 20, 0.0)
    diff, var = mmd2_difference_with_variance(
        real, gaussians(g, DRAWS, n_a, shift), gaussians(g, DRAWS, n_b, shift)
    )
    p = normal_cdf(diff / var.sqrt())
    q = [
        round(x, 3) for x in torch.quantile(p, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    ]
    print(
        f"relative test, A and B one distribution (n_a={n_a}, n_b={n_b}, shift {shift}): "
        f"P(p < 0.05) = {float((p < 0.05).double().mean()):.3f}, p quartiles {q}"
    )
