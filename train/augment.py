"""Data augmentation on batches already on the device: random shifts of whole images.

    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)   # drawn once per epoch
    xb = shift_images(xb, offsets[idx], pad)                        # each image moved by offset − pad
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["shift_images"]


def shift_images(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each image of ``images`` (N, C, H, W) by ``offsets - pad`` pixels (zero fill);
    ``offsets`` (N, 2) holds integers in [0, 2·pad]: row and column."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    hp, wp = h + 2 * pad, w + 2 * pad
    rows, cols, channels = (torch.arange(size, device=images.device) for size in (h, w, c))
    start = torch.arange(n, device=images.device) * (c * hp * wp) + offsets[:, 0] * wp + offsets[:, 1]
    grid = (channels * (hp * wp))[:, None, None] + (rows * wp)[:, None] + cols
    return torch.take(padded, start[:, None, None, None] + grid)
