"""Approximate implicit differentiation (AID) with any :mod:`implicitnets.linear` solver.

At (an approximation ``w`` of) the fixed point ``w(λ) = Φ(w(λ), λ)`` the hypergradient of
``f(λ) = E(w(λ), λ)`` is

    ∇f(λ) = ∇₂E(w, λ) + ∂₂Φ(w, λ)ᵀ v,   (I − ∂₁Φ(w, λ)ᵀ) v = ∇₁E(w, λ).

The linear system is solved with ``k`` iterations of a linear solver using only
vector–Jacobian products ``∂₁Φᵀu`` on the graph of one map step:
``linear.FixedPoint`` (AID-FP, the Neumann series), ``linear.CG`` (AID-CG — only when
``∂₁Φ`` is symmetric, e.g. :class:`GradientStep`), ``linear.NormalCG``, ``linear.GMRES``
or ``linear.Exact``.  Memory O(d), independent of the inner iteration count.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .. import linear
from ..errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from ._state import InnerMap, OuterLoss, as_hparams, check_finite, fill_none, leaves, outer_grads

__all__ = ["AID", "AIDResult", "aid"]

_LINEAR_SOLVERS = (linear.FixedPoint, linear.CG, linear.NormalCG, linear.GMRES, linear.Exact)


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

    A solve that fails (``info.converged`` is False: above ``tol`` when ``tol > 0``; residual
    grown beyond ‖∇₁E‖ when ``tol = 0``, i.e. diverged) warns with :class:`ConvergenceWarning`, or raises
    :class:`ConvergenceError` when ``strict=True``.  A non-finite ``v`` always raises
    :class:`NonFiniteError`.
    """

    solver: linear.LinearSolver
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.solver, _LINEAR_SOLVERS):
            raise ValueError(
                "AID: solver must be an implicitnets.linear solver (FixedPoint, CG, NormalCG, "
                f"GMRES, Exact); got {self.solver!r}"
            )
        if not isinstance(self.strict, bool):
            raise ValueError(f"AID: strict must be a bool, got {self.strict!r}")

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

            def vjp(u: Tensor) -> Tensor:
                (out,) = torch.autograd.grad(fw, w_leaf, u, retain_graph=True, allow_unused=True)
                return torch.zeros_like(u) if out is None else out

            rmatvec = None
            if isinstance(self.solver, linear.NormalCG):
                dummy = torch.zeros_like(fw, requires_grad=True)
                (jtu,) = torch.autograd.grad(fw, w_leaf, dummy, retain_graph=True, create_graph=True)

                def rmatvec(y: Tensor) -> Tensor:  # (I − ∂₁Φ) y, via the double-vjp trick
                    (jy,) = torch.autograd.grad(jtu, dummy, y, retain_graph=True)
                    return y - jy

            v, info = self.solver.solve(lambda u: u - vjp(u), b, x0=None if v0 is None else v0.detach(), rmatvec=rmatvec)
            v = v.detach()
            name = type(self.solver).__name__
            if not bool(torch.isfinite(v).all()):
                raise NonFiniteError(f"AID: the {name} solve of (I - d1Phi^T) v = grad_w E produced NaN/Inf")
            if not info.converged:
                message = (
                    f"AID: the {name} solve of (I - d1Phi^T) v = grad_w E did not converge (relative residual "
                    f"{info.residual:.3e} after {info.iterations} iterations); is Phi a contraction at w?"
                )
                if self.strict:
                    raise ConvergenceError(message)
                warnings.warn(message, ConvergenceWarning, stacklevel=2)
            cross = torch.autograd.grad(fw, hp, v, allow_unused=True)
        grads = tuple(g + c for g, c in zip(grads_h, fill_none(cross, hp)))
        check_finite("AID", grads)
        return AIDResult(grads, v, info)

    def __call__(
        self, phi: InnerMap, outer_loss: OuterLoss, w: Tensor, hparams: Tensor | Sequence[Tensor], v0: Tensor | None = None
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
