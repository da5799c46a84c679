"""What the operator-splitting solvers share: the map they need and their iteration.

:class:`~implicitnets.solvers.ForwardBackward` and
:class:`~implicitnets.solvers.PeacemanRachford` solve ``0 ∈ (I − W) z − u + ∂f(z)``, the
fixed-point problem ``z = prox_f(W z + u)`` of a :class:`~implicitnets.maps.MonotoneMap`.
They use more of the map than its value, so they accept only a
:class:`~implicitnets.BoundMap` (what :func:`~implicitnets.fixed_point` and
:class:`~implicitnets.FixedPointLayer` hand a solver) whose ``map`` is a ``MonotoneMap``,
and tensor states.  Both evaluate the map once per iteration, ``Φ(z) = prox(W z + u)`` at
their current point, and stop on its relative residual ``‖Φ(z) − z‖ / ‖Φ(z)‖`` like every
other solver; they differ in the points they visit (:meth:`SplittingSolver.iterates`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Generator
from dataclasses import dataclass

from torch import Tensor

from ..bound_map import BoundMap
from ..maps.monotone import MonotoneMap
from ..options import check_real
from ..state import State
from .base import IterativeSolver, SolverStats
from .monitor import Monitor

__all__ = ["SplittingSolver", "monotone_map_of"]


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
class SplittingSolver(IterativeSolver):
    """An operator-splitting solver of a monotone map with step size ``alpha`` > 0.

    :meth:`iterates` yields the points ``z`` of the iteration with the map's value ``Φ(z)``
    there, one map evaluation each; the solve records the residual of each pair (``tol``,
    ``check_every``, ``on_failure``, ``freeze_converged`` and ``return_best`` as in
    :class:`FixedPointIteration`; ``tol = 0`` runs exactly ``max_iter`` evaluations), asks
    for the next pair only if it goes on, and returns ``Φ`` of the last point.  When samples
    leave the active set the solve sends the iteration the rows that stay, and the
    iteration keeps only those rows of its own state (the samples' iterations are
    independent, so the others go on exactly as before).
    """

    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real(type(self).__name__, "alpha", self.alpha, low=0, low_open=True)

    @abc.abstractmethod
    def iterates(self, f: MonotoneMap, z0: Tensor, u: Tensor) -> Generator[tuple[Tensor, Tensor], Tensor | None, None]:
        """The pairs ``(z, Φ(z))`` of the iteration from ``z0`` for ``f`` at input ``u``, without
        end.  The value sent back after a pair is ``None`` or the rows (of the current batch) to
        keep: the iteration then drops every other row of its state, ``u`` included."""

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return ``Φ`` of the last iterate and the stats."""
        name = type(self).__name__
        f = monotone_map_of(name, g, z0)
        monitor = Monitor(name, self.max_iter, self.tol, self.check_every, z0,
                          freeze=self.freeze_converged, best=self.return_best)
        pairs = self.iterates(f, z0, g.u)
        z, fz = next(pairs)
        for k in range(self.max_iter):
            if monitor.record(fz, z, fz) or k == self.max_iter - 1:
                break  # no step is taken after the last evaluation
            z, fz = pairs.send(monitor.keep)
        return monitor.finish(fz, self.on_failure)
