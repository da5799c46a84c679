"""Stochastic implicit differentiation (SID, Grazzi, Pontil & Salzo 2021).

For a stochastic inner map ``Φ(w, λ; ξ)`` with ``E_ξ Φ(w, λ; ξ) = Φ(w, λ)``:

1. inner solve, ``t`` minibatch steps ``w_{s+1} = (1 − η_s) w_s + η_s Φ(w_s, λ; ξ_s)``
   (for a gradient-step map this is SGD with step ``η_s α``);
2. linear system, ``k`` stochastic fixed-point steps
   ``v_{j+1} = (1 − γ_j) v_j + γ_j (∂₁Φ(w_t, λ; ζ_j)ᵀ v_j + ∇₁E(w_t, λ))``;
3. ``ĝ = ∇₂E(w_t, λ) + ∂₂Φ(w_t, λ; ζ)ᵀ v_k``.

Decreasing steps (``η_s, γ_j → 0``, e.g. :class:`DecayingStep`) make ``ĝ → ∇f`` in mean
square as ``t, k → ∞``; ``w₀`` and ``v₀`` from the previous outer step are warm starts.
With full batches and unit steps, SID is AID-FP at ``w_t`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._state import Hparams, OuterLoss, as_hparams, check_finite, check_steps, fill_none, leaves, outer_grads

__all__ = ["SID", "SIDResult", "DecayingStep", "StochasticMap"]

StochasticMap = Callable[[Tensor, Hparams, Any], Tensor]
"""``Φ(w, λ; batch) -> w``: the inner map evaluated on one minibatch."""


@dataclass(frozen=True)
class DecayingStep:
    """Step-size schedule ``η_j = initial / (1 + decay · j)^power`` (``decay = 0``: constant)."""

    initial: float = 1.0
    decay: float = 0.0
    power: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.initial <= 1.0:
            raise ValueError(f"DecayingStep: initial must be in (0, 1], got {self.initial!r}")
        if not self.decay >= 0.0:
            raise ValueError(f"DecayingStep: decay must be >= 0, got {self.decay!r}")
        if not self.power > 0.0:
            raise ValueError(f"DecayingStep: power must be > 0, got {self.power!r}")

    def __call__(self, j: int) -> float:
        return self.initial / (1.0 + self.decay * j) ** self.power


@dataclass(frozen=True)
class SIDResult:
    """Hypergradient estimate and the final ``w_t``, ``v_k`` (warm starts for the next call)."""

    grads: tuple[Tensor, ...]
    w: Tensor
    v: Tensor


@dataclass(frozen=True)
class SID:
    """SID with ``inner_steps`` = t, ``linear_steps`` = k and step-size schedules."""

    inner_steps: int
    linear_steps: int
    inner_step_size: DecayingStep = DecayingStep()
    linear_step_size: DecayingStep = DecayingStep()

    def __post_init__(self) -> None:
        check_steps("SID", "inner_steps", self.inner_steps)
        check_steps("SID", "linear_steps", self.linear_steps)
        for name in ("inner_step_size", "linear_step_size"):
            if not isinstance(getattr(self, name), DecayingStep):
                raise ValueError(f"SID: {name} must be a DecayingStep, got {getattr(self, name)!r}")

    def run(
        self,
        phi: StochasticMap,
        outer_loss: OuterLoss,
        w0: Tensor,
        hparams: Tensor | Sequence[Tensor],
        sample: Callable[[], Any],
        v0: Tensor | None = None,
    ) -> SIDResult:
        """Run SID from the warm starts ``w0`` (and ``v0``, default zero); ``sample()``
        returns a fresh minibatch each call."""
        if not callable(sample):
            raise ValueError("SID: sample must be a callable returning a minibatch")
        hp = leaves(as_hparams(hparams))
        hp_const = tuple(h.detach() for h in hp)
        w = w0.detach()
        with torch.enable_grad():
            for s in range(self.inner_steps):
                eta = self.inner_step_size(s)
                w = ((1.0 - eta) * w + eta * phi(w, hp_const, sample())).detach()
        grads_w, grads_h = outer_grads(outer_loss, w, hp)
        b = grads_w[0]
        v = torch.zeros_like(w) if v0 is None else v0.detach().clone()
        w_leaf = w.detach().requires_grad_()
        with torch.enable_grad():
            for j in range(self.linear_steps):
                gamma = self.linear_step_size(j)
                fw = phi(w_leaf, hp_const, sample())
                (jtv,) = fill_none(torch.autograd.grad(fw, w_leaf, v, allow_unused=True), (w_leaf,))
                v = ((1.0 - gamma) * v + gamma * (jtv + b)).detach()
            fw = phi(w_leaf, hp, sample())
            cross = fill_none(torch.autograd.grad(fw, hp, v, allow_unused=True), hp)
        grads = tuple(g + c for g, c in zip(grads_h, cross))
        check_finite("SID", grads)
        return SIDResult(grads, w, v)

    def __call__(
        self,
        phi: StochasticMap,
        outer_loss: OuterLoss,
        w0: Tensor,
        hparams: Tensor | Sequence[Tensor],
        sample: Callable[[], Any],
        v0: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        return self.run(phi, outer_loss, w0, hparams, sample, v0).grads
