"""The toy world's feature net: the `toy` KID feature space (the toy world's Inception).

A small CNN trained (scripts/make_toy_assets.py) to tell the base world from the teacher's style and to
name shape and colour, on both worlds, with blur augmentation so that a VAE's slight blur does not read
as a different distribution. Its features are the 64-d embedding before the heads, L2-normalised: KID
on unnormalised CNN features gives huge numbers dominated by a few channels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "feature_net.safetensors"


class ToyFeatureNet(nn.Module):
    """(N, 3, H, W) images in [0, 1] -> (N, 64) L2-normalised features; heads for training only."""

    def __init__(self, dim: int = 64, n_shapes: int = 3, n_colours: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 96, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(96, dim),
        )  # fmt: skip
        self.heads = nn.ModuleDict(
            {
                "world": nn.Linear(dim, 2),
                "shape": nn.Linear(dim, n_shapes),
                "colour": nn.Linear(dim, n_colours),
            }
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x * 2 - 1)  # (N, 64)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(images), dim=1)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads_of(self(images))

    def heads_of(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head logits of (N, 64) L2-normalised features, the `toy` KID features: no second pass of the body."""
        # Cosine classifier: the heads see only the embedding's direction, so everything they learn to
        # tell apart (world, shape, colour) survives the L2 normalisation of the KID features.
        z = 10 * features
        return {name: head(z) for name, head in self.heads.items()}


def load_feature_net(path: str | Path = WEIGHTS) -> ToyFeatureNet:
    """The trained toy feature net from the package's assets (made by scripts/make_toy_assets.py)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"toy feature net {path} is missing: run python scripts/make_toy_assets.py")
    net = ToyFeatureNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)
