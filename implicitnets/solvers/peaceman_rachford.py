"""Peaceman–Rachford splitting for the equilibrium of a monotone map (monDEQ)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..maps.monotone import MonotoneMap
from .splitting import SplittingSolver, Update

__all__ = ["PeacemanRachford"]


@dataclass(frozen=True)
class PeacemanRachford(SplittingSolver):
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

    alpha: float = 1.0

    def update(self, f: MonotoneMap, u: Tensor) -> Update:
        alpha = float(self.alpha)
        resolvent = f.resolvent(alpha)
        s: Tensor | None = None

        def step(z: Tensor, v: Tensor) -> Tensor:
            nonlocal s
            if s is None:  # s₀, and z = prox(s₀)
                s = torch.lerp(z, v, alpha)
                z = f.prox(s, alpha)
            half = 2 * z - s
            s = 2 * resolvent(half + alpha * u) - half
            return f.prox(s, alpha)

        return step
