"""Explicit baselines with about the parameter count of the equilibrium models.

* :class:`MLP` ``784 → 200 → 200 → 10`` (tanh): 199,210 parameters vs 199,010 for
  :class:`~models.FCEquilibrium` (width 200) — the equilibrium model unrolled twice, untied.
* :class:`CNN`: the conv equilibrium model's layers used once each, untied
  (space-to-depth, conv 4→C, ReLU, conv C→C, ReLU, max-pool, linear): C more parameters.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

__all__ = ["MLP", "CNN"]


class MLP(nn.Module):
    """``logits = H tanh(W₂ tanh(W₁ x + b₁) + b₂) + h`` on flattened images."""

    def __init__(self, in_features: int = 784, width: int = 200, num_classes: int = 10, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(rearrange(x, "b ... -> b (...)")))


class CNN(nn.Module):
    """Two 3×3 conv layers on the 14 × 14 space-to-depth image, max-pool, linear head."""

    def __init__(self, in_channels: int = 1, channels: int = 48, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"CNN: image_size must be a multiple of 4, got {image_size!r}")
        self.conv1 = nn.Conv2d(4 * in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * (image_size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # channels-last, as the conv equilibrium model's input (the same kernels)
        x = rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2).contiguous(memory_format=torch.channels_last)
        z = self.conv2(self.conv1(x).relu()).relu()
        z = reduce(z, "b c (h p) (w q) -> b c h w", "max", p=2, q=2)
        return self.head(rearrange(z, "b c h w -> b (c h w)"))
