"""Feature nets for `--feature {class_path: feature_nets.<Class>}` in tests (tests/ is on sys.path, not a package)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ColourStats(nn.Module):
    """Fixed, parameter-free features: per-channel mean and std plus a 4x4 thumbnail, (N, 54)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(2, 3))  # (N, 3)
        std = images.std(dim=(2, 3))  # (N, 3)
        thumb = F.adaptive_avg_pool2d(images, 4).flatten(1)  # (N, 48)
        return torch.cat([mean, std, thumb], dim=1)


class WrongShape(nn.Module):
    """Returns one number per image, (N,): not a feature matrix."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))
