"""What the operator-splitting solvers share: the map they need and their iteration.

:class:`~implicitnets.solvers.ForwardBackward` and
:class:`~implicitnets.solvers.PeacemanRachford` solve ``0 ∈ (I − W) z − u + ∂f(z)``, the
fixed-point problem ``z = prox_f(W z + u)`` of a :class:`~implicitnets.maps.MonotoneMap`.
They use more of the map than its value, so they accept only a
:class:`~implicitnets.BoundMap` (what :func:`~implicitnets.fixed_point` and
:class:`~implicitnets.FixedPointLayer` hand a solver) whose ``map`` is a ``MonotoneMap``,
and tensor states.  Both evaluate the map once per iteration, ``Φ(z) = prox(W z + u)``, and
stop on its relative residual ``‖Φ(z) − z‖ / ‖Φ(z)‖`` like every other solver; they differ
only in how the next ``z`` is made (:meth:`SplittingSolver.update`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..bound_map import BoundMap
from ..failure import FailurePolicy, Warn
from ..maps.monotone import MonotoneMap
from ..state import State
from .base import ForwardSolver, SolverStats
from .monitor import Monitor, check_common

__all__ = ["SplittingSolver", "monotone_map_of"]

Update = Callable[[Tensor, Tensor], Tensor]


def monotone_map_of(name: str, g: object, z0: object) -> MonotoneMap:
    """``g.map`` if ``g`` is a :class:`BoundMap` of a :class:`MonotoneMap` and ``z0`` a tensor;
    ``ValueError`` otherwise."""
    if not (isinstance(g, BoundMap) and isinstance(g.map, MonotoneMap)):
        got = f"BoundMap of {type(g.map).__name__}" if isinstance(g, BoundMap) else type(g).__name__
        raise ValueError(
            f"{name} is an operator-splitting solver: it needs a monotone map, i.e. g must be an "
            f"implicitnets.BoundMap whose map is an implicitnets.maps.MonotoneMap (e.g. maps.MonotoneFC), "
            f"got {got}; pass such a map to fixed_point / FixedPointLayer, or use FixedPointIteration or "
            "Anderson for other maps"
        )
    if not isinstance(z0, Tensor):
        raise ValueError(f"{name}: the state must be a tensor, got {type(z0).__name__}")
    return g.map


@dataclass(frozen=True)
class SplittingSolver(ForwardSolver):
    """An operator-splitting solver of a monotone map with step size ``alpha`` > 0.

    Each iteration evaluates ``v = W z + u`` and ``Φ(z) = prox(v)``, records the residual
    (``tol``, ``check_every``, ``on_failure`` as in :class:`FixedPointIteration`; ``tol = 0``
    runs exactly ``max_iter`` evaluations) and, unless it stops, moves ``z`` by the rule
    :meth:`update` builds once per solve.  Returns ``Φ`` of the last iterate.
    """

    max_iter: int = 50
    tol: float = 1e-5
    alpha: float = 1.0
    check_every: int | None = None
    on_failure: FailurePolicy = Warn()

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_common(name, self.max_iter, self.tol, self.check_every, self.on_failure)
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{name}: alpha must be a finite number > 0, got {alpha!r}")

    @abc.abstractmethod
    def update(self, f: MonotoneMap, u: Tensor) -> Update:
        """The rule ``(z, v) ↦ next z`` (``v = W z + u``) for one solve of ``f`` at input ``u``."""

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return ``Φ`` of the last iterate and the stats."""
        name = type(self).__name__
        f = monotone_map_of(name, g, z0)
        monitor = Monitor(name, self.max_iter, self.tol, self.check_every, z0)
        z, u = z0, g.u
        update = self.update(f, u)
        for k in range(self.max_iter):
            v = f.weight_mv(z) + u
            fz = f.prox(v, 1.0)  # Φ(z)
            stop = monitor.record(fz, z)
            if stop or k == self.max_iter - 1:
                break
            z = update(z, v)
        return fz, monitor.finish(self.on_failure)
