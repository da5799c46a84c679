"""The bilevel problem, the one result type and the protocol every method follows.

A bilevel problem is

    min_λ f(λ) = E(w(λ), λ)   subject to   w(λ) = Φ(w(λ), λ),

with Φ the *inner* map (e.g. a gradient step on an inner loss, whose fixed point is the
inner minimiser) and E the *outer* objective.  Every method answers one question,
:meth:`HypergradientMethod.hypergradient`: an estimate of ``∇f(λ)`` computed from a start
of the inner iteration, returned as a :class:`Hypergradient` that also carries what the
next call may warm-start from.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..solvers import SolverStats
from ..state import State
from ._state import InnerMap, OuterLoss

__all__ = ["Bilevel", "Hypergradient", "HypergradientMethod"]


@dataclass(frozen=True)
class Bilevel:
    """``min_λ E(w(λ), λ)`` with ``w(λ) = Φ(w(λ), λ)``.

    ``inner(w, λ) -> w`` is Φ (any callable, e.g. :class:`~implicitnets.maps.GradientStep`
    or an optimiser's map from :mod:`implicitnets.hypergrad`); ``outer(w, λ) -> scalar`` is
    E.  ``λ`` is a tuple of tensors; the state ``w`` a tensor or a tuple of tensors.  For
    stochastic methods (:class:`SID`) ``sample()`` returns a fresh minibatch and ``inner``
    takes it as a third argument, ``inner(w, λ, batch)``.

    Args:
        inner: The inner map Φ, ``inner(w, λ) -> w`` (``inner(w, λ, batch) -> w`` with
            ``sample``).
        outer: The outer objective E, ``outer(w, λ) -> scalar tensor``.
        sample: A callable returning a fresh minibatch, or ``None``.

    Raises:
        ValueError: ``inner`` or ``outer`` is not callable, or ``sample`` is neither
            ``None`` nor callable.
    """

    inner: InnerMap | Callable[[State, tuple[Tensor, ...], Any], State]
    outer: OuterLoss
    sample: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        if not callable(self.inner):
            raise ValueError(f"Bilevel: inner must be a callable (w, hparams) -> w, got {self.inner!r}")
        if not callable(self.outer):
            raise ValueError(f"Bilevel: outer must be a callable (w, hparams) -> scalar, got {self.outer!r}")
        if self.sample is not None and not callable(self.sample):
            raise ValueError(f"Bilevel: sample must be None or a callable returning a minibatch, got {self.sample!r}")


@dataclass(frozen=True)
class Hypergradient:
    """One hypergradient estimate and what the next call can continue from.

    ``grads``: ``∇f(λ)``, one tensor per hyperparameter (zeros for an unused one).
    ``w``: the inner state the method reached (detached): the warm start of the next inner
    solve.  ``v``: the adjoint solution of ``(I − ∂₁Φᵀ) v = ∇₁E`` where the method solved
    one (AID, SID, HOAG), else ``None``.  ``stats``: the core's :class:`SolverStats` where
    the inner solve ran through it (iterations, residuals, backward iterations).
    ``carry``: state private to the method that the next call continues (RTHO's tangents,
    HOAG's outer step).  Pass the whole result as the next call's ``start``.

    Args:
        grads: ``∇f(λ)``, one tensor per hyperparameter, shaped like it.
        w: The detached inner state reached.
        v: The adjoint solution, or ``None``.
        stats: The inner solve's :class:`~implicitnets.SolverStats`, or ``None``.
        carry: Method-private state for the next call, or ``None``.
    """

    grads: tuple[Tensor, ...]
    w: State
    v: Tensor | None = None
    stats: SolverStats | None = None
    carry: Any = None


Start = State | Hypergradient


def split_start(start: Start) -> tuple[State, Hypergradient | None]:
    """``(w0, previous)``: the inner start and, when ``start`` is a previous result, that result."""
    if isinstance(start, Hypergradient):
        return start.w, start
    if isinstance(start, list):
        start = tuple(start)
    if isinstance(start, Tensor) or (isinstance(start, tuple) and start and all(isinstance(t, Tensor) for t in start)):
        return start, None
    raise ValueError(f"start must be the inner state (a tensor or tuple of tensors) or a Hypergradient, "
                     f"got {type(start).__name__}")


class HypergradientMethod(abc.ABC):
    """A way to estimate ``∇f(λ)``; subclass it for your own.

    ``hypergradient(problem, hparams, start)`` runs the method from ``start`` (the inner
    state ``w₀``, or the previous call's :class:`Hypergradient` to warm-start from it) and
    returns a :class:`Hypergradient`.  It never writes ``.grad`` and never modifies its
    inputs.
    """

    @abc.abstractmethod
    def hypergradient(self, problem: Bilevel, hparams: Tensor | Sequence[Tensor], start: Start) -> Hypergradient:
        """Estimate ``∇f(λ)`` at ``λ = hparams``.

        Args:
            problem: The :class:`Bilevel` problem.
            hparams: The hyperparameters λ, a tensor or a sequence of tensors.
            start: The inner state ``w₀`` (a tensor or a tuple of tensors) or the previous
                call's :class:`Hypergradient`, to continue from it.

        Returns:
            The :class:`Hypergradient`: one gradient per hyperparameter, shaped like it.
        """
