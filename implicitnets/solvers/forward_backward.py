"""Forward–backward splitting for the equilibrium of a monotone map (monDEQ)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..failure import FailurePolicy, Warn
from ..state import State
from .base import ForwardSolver, SolverStats
from .monitor import Monitor, check_common
from .splitting import check_step_size, monotone_map_of

__all__ = ["ForwardBackward"]


@dataclass(frozen=True)
class ForwardBackward(ForwardSolver):
    """Forward–backward splitting for ``z = prox(W z + u)`` with ``I − W ⪰ m I``:

        z ← prox_{αf}(z − α((I − W) z − u)) = prox_{αf}((1 − α) z + α (W z + u)).

    Converges linearly for ``0 < α < 2m / L²``, ``L = ‖I − W‖₂`` (with ``m`` the map's
    margin); ``α = 1`` is plain fixed-point iteration.  ``g`` must be a
    :class:`~implicitnets.BoundMap` of a :class:`~implicitnets.maps.MonotoneMap` (else
    ``ValueError``).  Each iteration costs one product with ``W``, from which both the step
    and the map's value ``Φ(z) = prox(W z + u)`` follow; the relative residual
    ``‖Φ(z) − z‖ / ‖Φ(z)‖`` of the map itself is what stops the solve (``tol``,
    ``check_every`` and ``on_failure`` as in :class:`FixedPointIteration`; ``tol = 0`` runs
    exactly ``max_iter`` evaluations), and the solver returns ``Φ`` of its last iterate.
    Differentiable operations only, so ITD runs through it.
    """

    max_iter: int = 50
    tol: float = 1e-5
    alpha: float = 0.5
    check_every: int | None = None
    on_failure: FailurePolicy = Warn()

    def __post_init__(self) -> None:
        check_common("ForwardBackward", self.max_iter, self.tol, self.check_every, self.on_failure)
        check_step_size("ForwardBackward", self.alpha)

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return ``Φ`` of the last iterate and the stats."""
        f = monotone_map_of("ForwardBackward", g, z0)
        monitor = Monitor("ForwardBackward", self.max_iter, self.tol, self.check_every, z0)
        z, u, alpha = z0, g.u, float(self.alpha)
        for k in range(self.max_iter):
            v = f.weight_mv(z) + u
            fz = f.prox(v, 1.0)  # Φ(z)
            stop = monitor.record(fz, z)
            if stop or k == self.max_iter - 1:
                break
            z = f.prox(torch.lerp(z, v, alpha), alpha)
        return fz, monitor.finish(self.on_failure)
