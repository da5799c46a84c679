"""Reverse-mode hypergradients through the core's fixed-point machinery (ITD, AID, JFB).

The inner problem is solved exactly as an implicit layer solves its equilibrium:
``w = fixed_point(Φ, λ, solver=..., backward=..., z0=w₀)`` with the hyperparameters as the
layer's input, and ``∇f(λ) = ∇_λ E(w, λ)`` comes out of autograd.  The backward mode
decides which hypergradient that is (Grazzi et al. 2020):

* ``ITD()`` — reverse-mode iterative differentiation through the t solver steps,
  ``∇f_t(λ) = ∇₂E(w_t) + Σ_s B_sᵀ A_{s+1}ᵀ⋯A_tᵀ ∇₁E(w_t)`` (memory O(t·d));
  ``ITD(truncate=K)`` keeps the last K steps only.
* ``AID(linear_solver)`` — implicit differentiation at ``w_t``:
  ``(I − ∂₁Φ(w_t)ᵀ) v = ∇₁E(w_t)``, ``∇f = ∇₂E(w_t) + ∂₂Φ(w_t)ᵀ v`` with k iterations of
  ``linear.Neumann`` (AID-FP), ``CG`` (symmetric ∂₁Φ, e.g. gradient steps), ``NormalCG``,
  ``GMRES`` or ``Exact``; memory O(d).
* ``JacobianFree()`` — ``v = ∇₁E`` (one step through Φ).

With ``solver = FixedPointIteration(max_iter=t, tol=0)`` the inner solve is exactly t
steps of Φ from ``w₀``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backward import BackwardMode
from ..layer import fixed_point
from ..solvers import ForwardSolver
from ._state import as_hparams, check_finite, detach, fill_none, leaves
from .base import Bilevel, Hypergradient, HypergradientMethod, Start, split_start

__all__ = ["Backprop"]


@dataclass(frozen=True)
class Backprop(HypergradientMethod):
    """``∇f(λ) = ∇_λ E(w, λ)`` with ``w`` the inner solution as the core computes it.

    ``solver`` runs the inner solve from the start (any :class:`~implicitnets.ForwardSolver`);
    ``backward`` is the core's :class:`~implicitnets.ITD`, :class:`~implicitnets.AID` or
    :class:`~implicitnets.JacobianFree` (any :class:`~implicitnets.BackwardMode`).  An
    ``AID(..., warm_start=True)`` starts its adjoint solve from the previous result's ``v``.
    The state may be a tuple of tensors in every mode.

    Args:
        solver: The :class:`~implicitnets.ForwardSolver` of the inner solve, e.g.
            ``FixedPointIteration(max_iter=t, tol=0.0)`` for exactly t steps.
        backward: The :class:`~implicitnets.BackwardMode`.

    Raises:
        ValueError: ``solver`` or ``backward`` is of the wrong type.
    """

    solver: ForwardSolver
    backward: BackwardMode

    def __post_init__(self) -> None:
        if not isinstance(self.solver, ForwardSolver):
            raise ValueError(f"Backprop: solver must be an implicitnets.ForwardSolver (e.g. "
                             f"FixedPointIteration(max_iter=t, tol=0.0)), got {self.solver!r}")
        if not isinstance(self.backward, BackwardMode):
            raise ValueError(f"Backprop: backward must be an implicitnets.BackwardMode (ITD(), AID(...), "
                             f"JacobianFree()), got {self.backward!r}")

    def hypergradient(self, problem: Bilevel, hparams: Tensor | Sequence[Tensor], start: Start) -> Hypergradient:
        """Solve the inner problem from ``start`` and differentiate ``E`` at its solution.

        The arguments and the result are those of :meth:`HypergradientMethod.hypergradient`;
        a previous :class:`Hypergradient` as ``start`` also warm-starts the backward solve where
        the backward mode says (``BackwardMode.next_start``).

        Raises:
            ValueError: ``start`` is neither a state nor a :class:`Hypergradient`, or
                ``hparams`` is not a tensor or a non-empty sequence of tensors, or the outer
                loss is not a scalar.
            NonFiniteError: The hypergradient is NaN or Inf.
        """
        w0, previous = split_start(start)
        hp = leaves(as_hparams(hparams))
        known = previous is not None and previous.stats is not None
        adjoint_x0 = self.backward.next_start(previous.stats) if known else None
        with torch.enable_grad():
            w, stats = fixed_point(problem.inner, hp, solver=self.solver, backward=self.backward,
                                   z0=detach(w0), adjoint_x0=adjoint_x0)
            loss = problem.outer(w, hp)
            if loss.dim() != 0:
                raise ValueError(f"Backprop: the outer loss must be a scalar, got shape {tuple(loss.shape)}")
            raw = torch.autograd.grad(loss, hp, allow_unused=True) if loss.requires_grad else (None,) * len(hp)
        grads = fill_none(raw, hp)
        check_finite("Backprop", grads)
        return Hypergradient(grads, detach(w), stats.backward.adjoint, stats)
