"""Gradient-step maps ``Φ(w, x) = w − α ∇_w ℓ(w, x)`` (symmetric Jacobian ``I − α ∇²ℓ``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["GradientStep"]


class GradientStep(nn.Module):
    """One gradient-descent step on an inner loss: ``Φ(w, x) = w − α ∇_w ℓ(w, x)``.

    Its fixed points are the stationary points of ℓ(·, x); for a μ-strongly convex, L-smooth
    ℓ and ``0 < α ≤ 2/(L + μ)`` it is a contraction with ``q = 1 − αμ``.  ∂₁Φ = I − α∇²ℓ
    is symmetric, so ``linear.CG`` applies in the AID backward.  ``inner_loss(w, x)`` must
    return a scalar; if it is an ``nn.Module`` its parameters are the map's parameters.
    """

    def __init__(self, inner_loss: Callable[[Tensor, Tensor], Tensor], step_size: float) -> None:
        super().__init__()
        if not callable(inner_loss):
            raise ValueError(f"GradientStep: inner_loss must be callable, got {inner_loss!r}")
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not (
            math.isfinite(step_size) and step_size > 0
        ):
            raise ValueError(f"GradientStep: step_size must be a finite number > 0, got {step_size!r}")
        self.inner_loss = inner_loss
        self.step_size = float(step_size)

    def forward(self, w: Tensor, x: Tensor) -> Tensor:
        track = torch.is_grad_enabled()
        with torch.enable_grad():
            wg = w if (track and w.requires_grad) else w.detach().requires_grad_()
            loss = self.inner_loss(wg, x)
            if loss.dim() != 0:
                raise ValueError(f"GradientStep: inner_loss must return a scalar, got shape {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss, wg, create_graph=track)
        return w - self.step_size * grad

    def extra_repr(self) -> str:
        return f"step_size={self.step_size}"
