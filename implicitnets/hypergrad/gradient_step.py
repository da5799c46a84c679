"""The gradient-step map of an inner loss: ``Φ(w, λ) = w − η ∇₁L(w, λ)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._state import Hparams

__all__ = ["GradientStep"]

StepSize = float | Callable[[Hparams], Tensor]


@dataclass(frozen=True)
class GradientStep:
    """``Φ(w, λ) = w − η ∇₁L(w, λ)`` for an inner loss ``L(w, λ) -> scalar``.

    Its fixed points are the stationary points of ``L(·, λ)``; ``∂₁Φ = I − η ∇²₁L`` is
    symmetric, so the adjoint system ``(I − ∂₁Φᵀ) v = ∇₁E`` is ``η ∇²₁L v = ∇₁E``, SPD for
    strongly convex ``L`` (plain CG applies).  For ``0 < η ≤ 1/Lip(∇L)`` Φ is a
    contraction with constant ``1 − η μ``.

    ``step_size`` is a positive float or a callable ``λ -> η`` (a hyperparameter itself).
    The gradient is taken with :func:`torch.func.grad`, so the map composes with reverse
    mode (ITD, AID) and forward mode (:class:`ForwardITD`, :class:`RTHO`) alike.
    """

    inner_loss: Callable[[Tensor, Hparams], Tensor]
    step_size: StepSize

    def __post_init__(self) -> None:
        if not callable(self.inner_loss):
            raise ValueError("GradientStep: inner_loss must be callable (w, hparams) -> scalar")
        if not callable(self.step_size):
            size = self.step_size
            if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
                raise ValueError(f"GradientStep: step_size must be > 0 or a callable, got {self.step_size!r}")

    def eta(self, hparams: Hparams) -> Tensor | float:
        return self.step_size(hparams) if callable(self.step_size) else float(self.step_size)

    def __call__(self, w: Tensor, hparams: Hparams) -> Tensor:
        return w - self.eta(hparams) * torch.func.grad(self.inner_loss)(w, hparams)
