"""HOAG (Pedregosa 2016): hypergradients with inexact, warm-started inner and adjoint
solves whose tolerances follow a summable schedule.

At outer step k with tolerance ``ε_k`` (``Σ ε_k < ∞``):

1. solve ``w = Φ(w, λ_k)`` from the previous ``w`` until ‖Φ(w) − w‖/‖Φ(w)‖ ≤ ε_k;
2. solve ``(I − ∂₁Φᵀ) v = ∇₁E`` from the previous ``v`` to relative residual ε_k;
3. return ``∇₂E + ∂₂Φᵀ v``; :func:`optimize` takes ``λ_{k+1} = P(λ_k − lr · ∇f)``.

Steps 1–2 are :class:`Backprop` with ``FixedPointIteration(tol=ε_k)`` and
``AID(linear_solver(tol=ε_k), warm_start=True)``.  Summable errors keep inexact
hypergradient descent convergent while the early, far-from-optimal steps stay cheap.
(Pedregosa's adaptive step-size rule is not included.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .. import linear
from ..backward import AID
from ..solvers import FixedPointIteration
from ._state import check_steps
from .backprop import Backprop
from .base import Bilevel, Hypergradient, HypergradientMethod, Start, split_start

__all__ = ["HOAG", "PowerSchedule", "GeometricSchedule"]


@dataclass(frozen=True)
class PowerSchedule:
    """``ε_k = initial / (k + 1)^power`` with ``power > 1`` (summable).

    Args:
        initial: ``ε_0``, > 0.
        power: The exponent, > 1.

    Raises:
        ValueError: An option is out of range.
    """

    initial: float = 1e-2
    power: float = 2.0

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValueError(f"PowerSchedule: initial must be > 0, got {self.initial!r}")
        if not self.power > 1:
            raise ValueError(f"PowerSchedule: power must be > 1 for a summable schedule, got {self.power!r}")

    def __call__(self, k: int) -> float:
        return self.initial / (k + 1) ** self.power


@dataclass(frozen=True)
class GeometricSchedule:
    """``ε_k = initial · rate^k`` with ``0 < rate < 1`` (summable).

    Args:
        initial: ``ε_0``, > 0.
        rate: The ratio, in ``(0, 1)``.

    Raises:
        ValueError: An option is out of range.
    """

    initial: float = 1e-2
    rate: float = 0.9

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValueError(f"GeometricSchedule: initial must be > 0, got {self.initial!r}")
        if not 0 < self.rate < 1:
            raise ValueError(f"GeometricSchedule: rate must be in (0, 1), got {self.rate!r}")

    def __call__(self, k: int) -> float:
        return self.initial * self.rate**k


@dataclass(frozen=True)
class HOAG(HypergradientMethod):
    """HOAG hypergradients: call k uses tolerance ``tolerance(k)`` for both solves.

    ``linear_solver`` is any :mod:`implicitnets.linear` solver; a dataclass with a ``tol``
    field gets ``tol = ε_k`` (CG for gradient-step maps).  The inner solve is
    :class:`~implicitnets.FixedPointIteration` with at most ``max_inner`` steps.  The
    outer step k is carried from one result to the next (a plain start is step 0).

    Args:
        linear_solver: The :class:`~implicitnets.linear.LinearSolver` of the adjoint solve.
        tolerance: The summable schedule ``ε_k`` (:class:`PowerSchedule` or
            :class:`GeometricSchedule`), a relative residual for both solves.
        max_inner: Maximum number of inner steps per call, an int >= 1.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    linear_solver: linear.LinearSolver
    tolerance: PowerSchedule | GeometricSchedule = PowerSchedule()
    max_inner: int = 10_000

    def __post_init__(self) -> None:
        check_steps("HOAG", "max_inner", self.max_inner, minimum=1)
        if not isinstance(self.linear_solver, linear.LinearSolver):
            raise ValueError(f"HOAG: linear_solver must be an implicitnets.linear.LinearSolver, "
                             f"got {self.linear_solver!r}")
        if not isinstance(self.tolerance, (PowerSchedule, GeometricSchedule)):
            raise ValueError(f"HOAG: tolerance must be a PowerSchedule or GeometricSchedule, got {self.tolerance!r}")

    def hypergradient(self, problem: Bilevel, hparams: Tensor | Sequence[Tensor], start: Start) -> Hypergradient:
        """Inner and adjoint solves to ``ε_k`` from the warm starts of ``start``.

        Args:
            problem: The :class:`Bilevel` problem.
            hparams: The hyperparameters λ, a tensor or a sequence of tensors.
            start: The inner state ``w₀`` (outer step 0) or the previous call's
                :class:`Hypergradient` (warm-starts ``w``, ``v`` and the step k).

        Returns:
            The :class:`Hypergradient`: one gradient per hyperparameter, shaped like it.
        """
        _, previous = split_start(start)
        k = 0 if previous is None or not isinstance(previous.carry, int) else previous.carry + 1
        eps = self.tolerance(k)
        solver = self.linear_solver
        if dataclasses.is_dataclass(solver) and any(f.name == "tol" for f in dataclasses.fields(solver)):
            solver = dataclasses.replace(solver, tol=eps)
        method = Backprop(FixedPointIteration(max_iter=self.max_inner, tol=eps), AID(solver, warm_start=True))
        return dataclasses.replace(method.hypergradient(problem, hparams, start), carry=k)
