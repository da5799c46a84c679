"""Failure policies: what :class:`~implicitnets.AID` does when its linear solve fails.

The adjoint system ``(I − ∂₁Φ(w)ᵀ) v = g`` has no good solution when Φ is not a
contraction at ``w``.  A solve *fails* when it stops above its tolerance (``tol > 0``), when
its residual ends above ‖g‖ (``tol = 0``: it diverged), or when an iterate is NaN/Inf.
Whatever the policy, NaN/Inf never reaches a parameter gradient silently.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Warn", "Raise", "FallbackITD", "FallbackJacobianFree", "FailurePolicy"]


@dataclass(frozen=True)
class Warn:
    """Warn with :class:`ConvergenceWarning` and keep the approximate gradient.

    A non-finite solution raises :class:`NonFiniteError` instead: it would poison the
    parameters.
    """


@dataclass(frozen=True)
class Raise:
    """Raise :class:`ConvergenceError` (or :class:`NonFiniteError`) naming the solve."""


@dataclass(frozen=True)
class FallbackITD:
    """Warn, then recompute the forward solve with autograd and backpropagate through it.

    Gives the ITD gradient of the same solver run from the same start (memory O(t·d) for
    this one backward pass).  Needs the map to be an ``nn.Module`` so that its parameters
    are known.
    """


@dataclass(frozen=True)
class FallbackJacobianFree:
    """Warn, then use the Jacobian-free gradient: ``v = g`` (one step through Φ)."""


FailurePolicy = Warn | Raise | FallbackITD | FallbackJacobianFree
