"""Approximate implicit differentiation (AID) with any :mod:`implicitnets.linear` solver.

At (an approximation ``w`` of) the fixed point ``w(λ) = Φ(w(λ), λ)`` the hypergradient of
``f(λ) = E(w(λ), λ)`` is

    ∇f(λ) = ∇₂E(w, λ) + ∂₂Φ(w, λ)ᵀ v,   (I − ∂₁Φ(w, λ)ᵀ) v = ∇₁E(w, λ).

The linear system is solved with ``k`` iterations of a linear solver using only
vector–Jacobian products ``∂₁Φᵀu`` on the graph of one map step:
``linear.Neumann`` (AID-FP, the Neumann series), ``linear.CG`` (AID-CG — only when
``∂₁Φ`` is symmetric, e.g. :class:`GradientStep`), ``linear.NormalCG``, ``linear.GMRES``
or ``linear.Exact``.  Memory O(d), independent of the inner iteration count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import linear
from ..backward import adjoint_message, solve_adjoint
from ..failure import AdjointFailure, FailurePolicy, Warn
from ..operator import GraphJacobian
from ._state import InnerMap, OuterLoss, as_hparams, check_finite, fill_none, leaves, outer_grads

__all__ = ["AID", "AIDResult", "aid"]


@dataclass(frozen=True)
class AIDResult:
    """The hypergradient, the adjoint ``v`` (a warm start for the next solve) and the
    linear solver's report."""

    grads: tuple[Tensor, ...]
    v: Tensor
    info: linear.LinearInfo


@dataclass(frozen=True)
class AID:
    """AID hypergradient with ``solver`` for ``(I − ∂₁Φᵀ) v = ∇₁E``.

    The operator ``∂₁Φ`` is built once from the graph of one map step
    (:class:`~implicitnets.GraphJacobian`) and the solve is the core's
    :func:`~implicitnets.backward.solve_adjoint`.  A failed solve (``info.converged`` is
    False: above ``tol`` when ``tol > 0``; residual grown beyond ‖∇₁E‖ when ``tol = 0``)
    goes to ``on_failure`` (``Warn()`` warns, ``Raise()`` raises, ``FallbackJacobianFree()``
    uses ``v = ∇₁E``).  A non-finite ``v`` raises :class:`NonFiniteError`.
    """

    solver: linear.LinearSolver
    on_failure: FailurePolicy = Warn()

    def __post_init__(self) -> None:
        if not isinstance(self.solver, linear.LinearSolver):
            raise ValueError(f"AID: solver must be an implicitnets.linear.LinearSolver; got {self.solver!r}")
        if not isinstance(self.on_failure, FailurePolicy):
            raise ValueError(f"AID: on_failure must be a FailurePolicy (e.g. Warn(), Raise()); got {self.on_failure!r}")

    def solve(
        self,
        phi: InnerMap,
        outer_loss: OuterLoss,
        w: Tensor,
        hparams: Tensor | Sequence[Tensor],
        v0: Tensor | None = None,
    ) -> AIDResult:
        """Hypergradient at the given inner iterate ``w`` (a tensor), with ``v0`` as the
        linear solver's starting point (``None``: zero)."""
        if not isinstance(w, Tensor):
            raise ValueError("AID: the inner state must be a single tensor")
        hp = leaves(as_hparams(hparams))
        w_leaf = w.detach().requires_grad_()
        grads_w, grads_h = outer_grads(outer_loss, w, hp)
        b = grads_w[0]
        with torch.enable_grad():
            fw = phi(w_leaf, hp)
        v, info, finite = solve_adjoint(GraphJacobian(fw, w_leaf), b, self.solver, v0)
        if not (info.converged and finite):
            message = adjoint_message(self.solver, info, finite, "hypergrad.AID")
            v = self.on_failure.adjoint_failed(AdjointFailure(v, b, finite, message)).v
        v = v.to(b.dtype)
        with torch.enable_grad():
            cross = torch.autograd.grad(fw, hp, v, allow_unused=True)
        grads = tuple(g + c for g, c in zip(grads_h, fill_none(cross, hp)))
        check_finite("AID", grads)
        return AIDResult(grads, v, info)

    def __call__(
        self,
        phi: InnerMap,
        outer_loss: OuterLoss,
        w: Tensor,
        hparams: Tensor | Sequence[Tensor],
        v0: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """``∇₂E(w, λ) + ∂₂Φ(w, λ)ᵀ v``, one tensor per hyperparameter."""
        return self.solve(phi, outer_loss, w, hparams, v0).grads


def aid(
    phi: InnerMap,
    outer_loss: OuterLoss,
    w: Tensor,
    hparams: Tensor | Sequence[Tensor],
    solver: linear.LinearSolver,
    v0: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Functional form of :class:`AID`: the AID hypergradient at ``w`` with ``solver``."""
    return AID(solver)(phi, outer_loss, w, hparams, v0)
