"""Reverse-mode iterative differentiation (ITD), full or truncated.

With ``w_t = Φ(w_{t−1}, λ)`` (``w₀`` independent of ``λ``) and ``f_t(λ) = E(w_t(λ), λ)``,
reverse mode gives

    ∇f_t(λ) = ∇₂E(w_t, λ) + Σ_{s=1..t} B_sᵀ A_{s+1}ᵀ ⋯ A_tᵀ ∇₁E(w_t, λ),

``A_s = ∂₁Φ(w_{s−1}, λ)``, ``B_s = ∂₂Φ(w_{s−1}, λ)``.  Memory grows like O(t·d).
Truncation to the last ``K`` steps (Shaban et al. 2019) keeps only ``s > t − K``; from a
fixed point ``w₀ = w*`` it equals AID with ``K`` fixed-point iterations on the linear
system (Grazzi et al. 2020).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._state import InnerMap, OuterLoss, State, as_hparams, check_finite, check_steps, detach, fill_none, leaves
from .inner import iterate

__all__ = ["ReverseITD", "reverse_itd"]


@dataclass(frozen=True)
class ReverseITD:
    """Reverse-mode ITD through ``steps`` applications of Φ from ``w₀``.

    ``truncate=None`` differentiates through all ``t = steps`` steps; ``truncate=K`` runs the
    first ``t − K`` steps without autograd and backpropagates through the last ``K`` only.
    """

    steps: int
    truncate: int | None = None

    def __post_init__(self) -> None:
        check_steps("ReverseITD", "steps", self.steps)
        if self.truncate is not None:
            check_steps("ReverseITD", "truncate", self.truncate, minimum=1)

    def __call__(
        self, phi: InnerMap, outer_loss: OuterLoss, w0: State, hparams: Tensor | Sequence[Tensor]
    ) -> tuple[Tensor, ...]:
        """Return ``∇f_t(λ)``, one tensor per hyperparameter (``w₀`` is treated as constant)."""
        hp = leaves(as_hparams(hparams))
        k = self.steps if self.truncate is None else min(self.truncate, self.steps)
        w = iterate(phi, w0, hp, self.steps - k)
        with torch.enable_grad():
            w = detach(w)
            for _ in range(k):
                w = phi(w, hp)
            loss = outer_loss(w, hp)
            if not loss.requires_grad:
                return tuple(torch.zeros_like(h) for h in hp)
            grads = fill_none(torch.autograd.grad(loss, hp, allow_unused=True), hp)
        check_finite("ReverseITD", grads)
        return grads


def reverse_itd(
    phi: InnerMap,
    outer_loss: OuterLoss,
    w0: State,
    hparams: Tensor | Sequence[Tensor],
    steps: int,
    truncate: int | None = None,
) -> tuple[Tensor, ...]:
    """Functional form of :class:`ReverseITD`: ``∇f_t(λ)`` by reverse mode through t steps."""
    return ReverseITD(steps, truncate)(phi, outer_loss, w0, hparams)
