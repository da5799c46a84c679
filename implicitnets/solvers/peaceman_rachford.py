"""Peaceman–Rachford splitting for the equilibrium of a monotone map (monDEQ)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..failure import FailurePolicy, Warn
from ..state import State
from .base import ForwardSolver, SolverStats
from .monitor import Monitor, check_common
from .splitting import check_step_size, monotone_map_of

__all__ = ["PeacemanRachford"]


@dataclass(frozen=True)
class PeacemanRachford(ForwardSolver):
    """Peaceman–Rachford splitting for ``z = prox(W z + u)`` with ``I − W ⪰ m I``.

    On the auxiliary point ``s`` (with ``z = prox_{αf}(s)``)::

        s½ = 2z − s,   z½ = (I + α(I − W))⁻¹ (s½ + α u),   s ← 2z½ − s½,   z ← prox_{αf}(s).

    Converges linearly for every ``α > 0`` because ``I − W`` is strongly monotone and
    Lipschitz; the rate depends on α.  The resolvent is the map's
    :meth:`~implicitnets.maps.MonotoneMap.resolvent`, factorised once per solve (LU for
    :class:`~implicitnets.maps.MonotoneFC`, one inverse per frequency for
    :class:`~implicitnets.maps.MonotoneConv`).  The start ``s₀ = (1 − α) z₀ + α (W z₀ + u)``
    makes the exact equilibrium a fixed point of the iteration, so a warm start stays put.
    ``g`` must be a :class:`~implicitnets.BoundMap` of a
    :class:`~implicitnets.maps.MonotoneMap` (else ``ValueError``).  Each iteration evaluates
    the map once, ``Φ(z) = prox(W z + u)``, for the relative residual ``‖Φ(z) − z‖ / ‖Φ(z)‖``
    that stops the solve (``tol``, ``check_every`` and ``on_failure`` as in
    :class:`FixedPointIteration`; ``tol = 0`` runs exactly ``max_iter`` evaluations, i.e.
    ``max_iter − 1`` splitting steps), and the solver returns ``Φ`` of its last iterate.
    Differentiable operations only, so ITD runs through it.
    """

    max_iter: int = 50
    tol: float = 1e-5
    alpha: float = 1.0
    check_every: int | None = None
    on_failure: FailurePolicy = Warn()

    def __post_init__(self) -> None:
        check_common("PeacemanRachford", self.max_iter, self.tol, self.check_every, self.on_failure)
        check_step_size("PeacemanRachford", self.alpha)

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return ``Φ`` of the last iterate and the stats."""
        f = monotone_map_of("PeacemanRachford", g, z0)
        monitor = Monitor("PeacemanRachford", self.max_iter, self.tol, self.check_every, z0)
        z, u, alpha = z0, g.u, float(self.alpha)
        resolvent = f.resolvent(alpha)
        s = None
        for k in range(self.max_iter):
            v = f.weight_mv(z) + u
            fz = f.prox(v, 1.0)  # Φ(z)
            stop = monitor.record(fz, z)
            if stop or k == self.max_iter - 1:
                break
            if s is None:
                s = torch.lerp(z, v, alpha)
                z = f.prox(s, alpha)
            half = 2 * z - s
            s = 2 * resolvent(half + alpha * u) - half
            z = f.prox(s, alpha)
        return fz, monitor.finish(self.on_failure)
