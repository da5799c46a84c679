"""Real-time hyperparameter optimisation (RTHO, Franceschi et al. 2017).

One inner run of ``T`` steps; the forward-mode tangent ``Z_t = A_t Z_{t−1} + B_t`` is
propagated alongside it, and every ``period`` steps the hyperparameters take a step on the
current hypergradient estimate,

    λ ← λ − β (∇₂E(w_t, λ) + Z_tᵀ ∇₁E(w_t, λ)),

without restarting the inner run (``Z`` keeps accumulating under the changing λ).  Memory
O(m·d); the whole optimisation costs about one inner run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._state import Hparams, InnerMap, OuterLoss, State, as_hparams, check_finite, check_steps, detach, outer_grads
from .forward_itd import contract, tangent_basis, tangent_step, zero_tangents

__all__ = ["RTHO", "RTHOResult", "rtho"]


@dataclass
class RTHOResult:
    """Final inner state and hyperparameters, and ``E(w_t, λ)`` at every hyper-update."""

    w: State
    hparams: Hparams
    outer_losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RTHO:
    """Real-time HO: ``steps`` inner steps, a hypergradient step of size ``hyper_lr`` every
    ``period`` of them.  ``project`` (optional) maps λ back to its feasible set after each
    update (e.g. a clamp)."""

    steps: int
    hyper_lr: float
    period: int = 1
    vectorize: bool = True
    project: Callable[[Hparams], Hparams] | None = None

    def __post_init__(self) -> None:
        check_steps("RTHO", "steps", self.steps, minimum=1)
        check_steps("RTHO", "period", self.period, minimum=1)
        if isinstance(self.hyper_lr, bool) or not isinstance(self.hyper_lr, (int, float)) or not self.hyper_lr > 0:
            raise ValueError(f"RTHO: hyper_lr must be > 0, got {self.hyper_lr!r}")
        if self.project is not None and not callable(self.project):
            raise ValueError("RTHO: project must be None or a callable hparams -> hparams")

    def run(self, phi: InnerMap, outer_loss: OuterLoss, w0: State, hparams: Tensor | Sequence[Tensor]) -> RTHOResult:
        """Run the inner dynamics once, updating λ on the fly; inputs are not modified."""
        hp = tuple(h.detach().clone() for h in as_hparams(hparams))
        w, basis = detach(w0), tangent_basis(hp)
        Z = zero_tangents(w, hp)
        result = RTHOResult(w, hp)
        for t in range(1, self.steps + 1):
            w, Z = tangent_step(phi, w, hp, Z, basis, self.vectorize)
            if t % self.period == 0:
                gw, gh = outer_grads(outer_loss, w, hp)
                grads = contract(Z, gw, gh, hp)
                check_finite("RTHO", grads)
                with torch.no_grad():
                    result.outer_losses.append(float(outer_loss(w, hp)))
                hp = tuple(h - self.hyper_lr * g for h, g in zip(hp, grads))
                if self.project is not None:
                    hp = tuple(h.detach() for h in as_hparams(self.project(hp)))
        result.w, result.hparams = w, hp
        return result


def rtho(
    phi: InnerMap,
    outer_loss: OuterLoss,
    w0: State,
    hparams: Tensor | Sequence[Tensor],
    steps: int,
    hyper_lr: float,
    period: int = 1,
) -> RTHOResult:
    """Functional form of :class:`RTHO`."""
    return RTHO(steps, hyper_lr, period).run(phi, outer_loss, w0, hparams)
