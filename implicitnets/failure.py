"""Failure policies: what happens when a forward or an adjoint solve fails.

A forward solve fails when it stops above its tolerance.  The adjoint system
``(I − ∂₁Φ(w)ᵀ) v = g`` fails when its solve stops above its tolerance (``tol > 0``), ends
with a residual above ‖g‖ (``tol = 0``: it diverged), or meets NaN/Inf.  A policy is an
object with two methods, :meth:`FailurePolicy.forward_failed` and
:meth:`FailurePolicy.adjoint_failed`; subclass :class:`FailurePolicy` to write your own.
Whatever the policy, NaN/Inf never reaches a parameter gradient silently: the built-in
policies raise :class:`NonFiniteError` for a non-finite adjoint solution.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError

__all__ = [
    "FailurePolicy",
    "AdjointFailure",
    "Resolution",
    "Warn",
    "Raise",
    "FallbackITD",
    "FallbackJacobianFree",
]


@dataclass(frozen=True)
class AdjointFailure:
    """A failed adjoint solve, as handed to :meth:`FailurePolicy.adjoint_failed`.

    ``v`` is the solver's answer, ``g`` the right-hand side, ``finite`` whether ``v`` is
    finite, ``message`` a description naming the solver and its residual.  ``itd`` (when
    not ``None``) recomputes the forward solve with autograd and returns the ITD gradients
    of the layer's extra inputs.

    Args:
        v: The adjoint solver's answer.
        g: The right-hand side of the adjoint system.
        finite: Whether ``v`` is finite.
        message: A description naming the solver and its residual.
        itd: A callable ``itd(g)`` returning the ITD gradients of the extra inputs, or
            ``None`` when the solve cannot be recomputed.
    """

    v: Tensor
    g: Tensor
    finite: bool
    message: str
    itd: Callable[[Tensor], tuple[Tensor | None, ...]] | None = None


@dataclass(frozen=True)
class Resolution:
    """What a policy returns for a failed adjoint solve.

    ``v`` replaces the adjoint solution (the cotangent passed on through ``∂₂Φᵀ``);
    ``extra`` — gradients of the layer's extra inputs — are used instead when given
    (``v`` is then typically zero); ``fallback`` names the method used, for the statistics.

    Args:
        v: The adjoint solution to use, shaped like the failed one.
        extra: Gradients of the layer's extra inputs (``None`` entries allowed), or ``None``.
        fallback: Name of the fallback method (e.g. ``"ITD"``), or ``None``.
    """

    v: Tensor
    extra: tuple[Tensor | None, ...] | None = None
    fallback: str | None = None


class FailurePolicy(abc.ABC):
    """Decides what a failed solve does: warn, raise, or substitute another gradient."""

    #: whether :meth:`adjoint_failed` may call ``failure.itd`` (AID then wires the inputs
    #: the recomputation needs into its autograd node)
    needs_itd: bool = False

    def forward_failed(self, message: str) -> None:
        """A forward solve stopped above its tolerance.  Default: warn.

        Args:
            message: A description naming the solver, its residual and tolerance.
        """
        warnings.warn(message, ConvergenceWarning, stacklevel=4)

    @abc.abstractmethod
    def adjoint_failed(self, failure: AdjointFailure) -> Resolution:
        """An adjoint solve failed; return the gradient to use (or raise).

        Args:
            failure: The :class:`AdjointFailure`.

        Returns:
            The :class:`Resolution` to use.
        """


def _no_nan(failure: AdjointFailure) -> None:
    if not failure.finite:
        raise NonFiniteError(failure.message)


@dataclass(frozen=True)
class Warn(FailurePolicy):
    """Warn with :class:`ConvergenceWarning` and keep the approximate result.

    A non-finite adjoint solution raises :class:`NonFiniteError` instead: it would poison
    the parameters.
    """

    def adjoint_failed(self, failure: AdjointFailure) -> Resolution:
        _no_nan(failure)
        warnings.warn(failure.message, ConvergenceWarning, stacklevel=3)
        return Resolution(failure.v)


@dataclass(frozen=True)
class Raise(FailurePolicy):
    """Raise :class:`ConvergenceError` (or :class:`NonFiniteError`) naming the solve, for a
    forward and an adjoint failure alike."""

    def forward_failed(self, message: str) -> None:
        raise ConvergenceError(message)

    def adjoint_failed(self, failure: AdjointFailure) -> Resolution:
        _no_nan(failure)
        raise ConvergenceError(failure.message)


@dataclass(frozen=True)
class FallbackITD(FailurePolicy):
    """Warn, then recompute the forward solve with autograd and backpropagate through it.

    Gives the ITD gradient of the same solver run from the same start (memory O(t·d) for
    this one backward pass).  Needs the map to be an ``nn.Module`` so that its parameters
    are known.
    """

    needs_itd = True

    def adjoint_failed(self, failure: AdjointFailure) -> Resolution:
        if failure.itd is None:
            raise ValueError(f"FallbackITD cannot recompute this solve: {failure.message}")
        warnings.warn(failure.message + "; falling back to ITD", ConvergenceWarning, stacklevel=3)
        grads = failure.itd(failure.g)
        if not all(t is None or bool(t.isfinite().all()) for t in grads):
            raise NonFiniteError(failure.message + "; the ITD fallback gradient is NaN/Inf too")
        return Resolution(torch.zeros_like(failure.g), grads, "ITD")


@dataclass(frozen=True)
class FallbackJacobianFree(FailurePolicy):
    """Warn, then use the Jacobian-free gradient: ``v = g`` (one step through Φ)."""

    def adjoint_failed(self, failure: AdjointFailure) -> Resolution:
        message = failure.message + "; falling back to the Jacobian-free gradient"
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
        return Resolution(failure.g, None, "JacobianFree")
