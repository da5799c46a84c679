"""HOAG outer loop (Pedregosa 2016): hypergradient descent with inexact, warm-started
inner and adjoint solves whose tolerances follow a summable schedule.

At outer step k with tolerance ``ε_k`` (``Σ ε_k < ∞``):

1. solve ``w = Φ(w, λ_k)`` from the previous ``w`` until ‖Φ(w) − w‖/‖Φ(w)‖ ≤ ε_k;
2. solve ``(I − ∂₁Φᵀ) v = ∇₁E`` from the previous ``v`` to relative residual ε_k;
3. ``λ_{k+1} = P(λ_k − lr · (∇₂E + ∂₂Φᵀ v))`` (``P`` an optional projection).

Summable errors keep inexact hypergradient descent convergent while the early, far-from-
optimal steps stay cheap.  (Pedregosa's adaptive step-size rule is not included: ``lr`` is
constant.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import linear
from ..solvers import FixedPointIteration
from ._state import Hparams, InnerMap, OuterLoss, as_hparams, check_steps
from .aid import AID

__all__ = ["HOAG", "HOAGResult", "HOAGStep", "PowerSchedule", "GeometricSchedule"]


@dataclass(frozen=True)
class PowerSchedule:
    """``ε_k = initial / (k + 1)^power`` with ``power > 1`` (summable)."""

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
    """``ε_k = initial · rate^k`` with ``0 < rate < 1`` (summable)."""

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
class HOAGStep:
    """One HOAG hypergradient: ``∇f`` estimate, the new warm starts ``w``, ``v``, the
    tolerance used and the iteration counts of the two solves."""

    grads: tuple[Tensor, ...]
    w: Tensor
    v: Tensor
    tolerance: float
    inner_iterations: int
    linear_iterations: int


@dataclass
class HOAGResult:
    """Final ``λ``, ``w``, ``v`` and per-step ``E(w, λ)``, tolerances and iteration counts."""

    hparams: Hparams
    w: Tensor
    v: Tensor | None
    outer_losses: list[float] = field(default_factory=list)
    tolerances: list[float] = field(default_factory=list)
    inner_iterations: list[int] = field(default_factory=list)
    linear_iterations: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class HOAG:
    """``outer_steps`` HOAG steps of size ``lr`` with tolerances ``tolerance(k)``.

    ``linear_solver`` is any :mod:`implicitnets.linear` solver (its ``tol`` is replaced by
    ``ε_k`` at each step; CG for gradient-step maps); the inner solve is
    :class:`implicitnets.FixedPointIteration` with at most ``max_inner`` steps.
    """

    outer_steps: int
    lr: float
    linear_solver: linear.LinearSolver
    tolerance: PowerSchedule | GeometricSchedule = PowerSchedule()
    max_inner: int = 10_000
    project: Callable[[Hparams], Hparams] | None = None

    def __post_init__(self) -> None:
        check_steps("HOAG", "outer_steps", self.outer_steps, minimum=1)
        check_steps("HOAG", "max_inner", self.max_inner, minimum=1)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"HOAG: lr must be > 0, got {self.lr!r}")
        if not isinstance(self.tolerance, (PowerSchedule, GeometricSchedule)):
            raise ValueError(f"HOAG: tolerance must be a PowerSchedule or GeometricSchedule, got {self.tolerance!r}")
        AID(self.linear_solver)  # validates the solver
        if self.project is not None and not callable(self.project):
            raise ValueError("HOAG: project must be None or a callable hparams -> hparams")

    def run(
        self,
        phi: InnerMap,
        outer_loss: OuterLoss,
        w0: Tensor,
        hparams: Tensor | Sequence[Tensor],
        callback: Callable[[int, Hparams, Tensor], None] | None = None,
    ) -> HOAGResult:
        """Run the outer loop; inputs are not modified.  ``callback(k, λ, w)`` after each step."""
        hp = tuple(h.detach().clone() for h in as_hparams(hparams))
        w, v = w0.detach(), None
        result = HOAGResult(hp, w, v)
        for k in range(self.outer_steps):
            step = self.hypergradient(k, phi, outer_loss, w, hp, v)
            w, v = step.w, step.v
            with torch.no_grad():
                result.outer_losses.append(float(outer_loss(w, hp)))
            result.tolerances.append(step.tolerance)
            result.inner_iterations.append(step.inner_iterations)
            result.linear_iterations.append(step.linear_iterations)
            hp = tuple(h - self.lr * g for h, g in zip(hp, step.grads))
            if self.project is not None:
                hp = tuple(h.detach() for h in as_hparams(self.project(hp)))
            if callback is not None:
                callback(k, hp, w)
        result.hparams, result.w, result.v = hp, w, v
        return result

    def hypergradient(
        self,
        k: int,
        phi: InnerMap,
        outer_loss: OuterLoss,
        w: Tensor,
        hparams: Tensor | Sequence[Tensor],
        v0: Tensor | None = None,
    ) -> HOAGStep:
        """Steps 1–2 of outer iteration ``k``: inner and adjoint solves to ``ε_k`` from the
        warm starts ``w``, ``v0``; returns the hypergradient (use it with any optimiser)."""
        hp = tuple(h.detach() for h in as_hparams(hparams))
        eps = self.tolerance(k)
        forward = FixedPointIteration(max_iter=self.max_inner, tol=eps)
        with torch.enable_grad():
            w, stats = forward.solve(lambda z: phi(z.detach(), hp).detach(), w.detach())
        w = w.detach()
        has_tol = any(f.name == "tol" for f in dataclasses.fields(self.linear_solver))
        solver = dataclasses.replace(self.linear_solver, tol=eps) if has_tol else self.linear_solver
        res = AID(solver).solve(phi, outer_loss, w, hp, v0=v0)
        return HOAGStep(res.grads, w, res.v, eps, stats.iterations, res.info.iterations)
