"""Damped (Krasnoselskii–Mann) fixed-point iteration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..failure import FailurePolicy, Warn
from ..state import State, map_parts
from .base import ForwardSolver, SolverStats
from .monitor import Monitor, check_common, check_structure

__all__ = ["FixedPointIteration"]


@dataclass(frozen=True)
class FixedPointIteration(ForwardSolver):
    """Damped fixed-point iteration ``z ← (1 − β) z + β g(z)`` for ``z = g(z)``.

    ``damping`` is β ∈ (0, 1]; β = 1 is plain Picard iteration.  Converges linearly with
    rate q when g is a q-contraction.  Stops when the relative residual is at most ``tol``
    (checked every ``check_every`` evaluations, see :mod:`implicitnets.solvers.monitor`);
    ``tol = 0`` runs exactly ``max_iter`` evaluations.  Non-convergence goes to
    ``on_failure.forward_failed`` (``Warn()`` warns, ``Raise()`` raises).  Works on tensor
    and tuple states part by part; the state takes the dtype of the map's output.
    """

    max_iter: int = 50
    tol: float = 1e-5
    damping: float = 1.0
    check_every: int | None = None
    on_failure: FailurePolicy = Warn()

    def __post_init__(self) -> None:
        check_common("FixedPointIteration", self.max_iter, self.tol, self.check_every, self.on_failure)
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"FixedPointIteration: damping must be in (0, 1], got {self.damping!r}")

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return the last iterate and its :class:`SolverStats`."""
        monitor = Monitor("FixedPointIteration", self.max_iter, self.tol, self.check_every, z0)
        z, beta = z0, float(self.damping)
        for _ in range(self.max_iter):
            fz = g(z)
            check_structure(fz, z)
            stop = monitor.record(fz, z)
            z = fz if beta == 1.0 else map_parts(lambda a, b: torch.lerp(a.to(b.dtype), b, beta), z, fz)
            if stop:
                break
        return z, monitor.finish(self.on_failure)
