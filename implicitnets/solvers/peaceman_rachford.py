"""Peaceman–Rachford splitting for the equilibrium of a monotone map (monDEQ)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..maps.monotone import MonotoneMap
from .splitting import SplittingSolver

__all__ = ["PeacemanRachford"]


@dataclass(frozen=True)
class PeacemanRachford(SplittingSolver):
    """Peaceman–Rachford splitting for ``z = prox(W z + u)`` with ``I − W ⪰ m I``.

    On the auxiliary point ``s`` (with ``z = prox_{αf}(s)``)::

        s½ = 2z − s,   z½ = (I + α(I − W))⁻¹ (s½ + α u),   s ← 2z½ − s½,   z ← prox_{αf}(s).

    Converges linearly for every ``α > 0`` because ``I − W`` is strongly monotone and
    Lipschitz; the rate depends on α.  The resolvent is the map's
    :meth:`~implicitnets.maps.MonotoneMap.resolvent`, computed once per solve (one inverse for
    :class:`~implicitnets.maps.MonotoneFC`, one inverse per frequency for
    :class:`~implicitnets.maps.MonotoneConv`).  The start ``s₀ = (1 − α) z₀ + α (W z₀ + u)``
    makes the exact equilibrium a fixed point of the iteration, so a warm start stays put.
    ``g`` must be a :class:`~implicitnets.BoundMap` of a
    :class:`~implicitnets.maps.MonotoneMap` (else ``ValueError``).  The map is evaluated at
    ``z₀`` (one product with ``W``) and then at every ``z½``, where the exact resolvent gives
    ``W z½ + u = z½ + (z½ − s½)/α`` for free: an iteration costs one resolvent solve.  The
    relative residual ``‖Φ(z½) − z½‖ / ‖Φ(z½)‖`` stops the solve (``tol``, ``check_every`` and
    ``on_failure`` as in :class:`FixedPointIteration`; ``tol = 0`` runs exactly ``max_iter``
    evaluations, i.e. ``max_iter − 1`` splitting steps), and the solver returns ``Φ`` of its
    last point.  Differentiable operations only, so ITD runs through it.

    The options every built-in solver shares (``max_iter``, ``tol``, ``check_every``,
    ``on_failure``, ``freeze_converged``, ``return_best``) are those of
    :class:`~implicitnets.IterativeSolver`.

    Args:
        alpha: Step size ``α > 0`` of the resolvent and the prox; any value converges.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    alpha: float = 1.0

    def iterates(self, f: MonotoneMap, z0: Tensor, u: Tensor) -> Generator[tuple[Tensor, Tensor], Tensor | None, None]:
        alpha = float(self.alpha)
        resolvent = f.resolvent(alpha)
        v = f.weight_mv(z0) + u
        keep = yield z0, f.prox(v, 1.0)
        s = torch.lerp(z0, v, alpha)  # s₀
        au = alpha * u
        while True:
            if keep is not None:
                s, au = s[keep], au[keep]
            half = f.reflect(s, alpha)  # s½ = 2z − s, z = prox(s)
            z_half = resolvent(half + au)
            s = torch.lerp(half, z_half, 2.0)  # 2z½ − s½
            # z½ + α(I − W) z½ = s½ + αu, so W z½ + u = z½ + (z½ − s½)/α: Φ(z½) without a product with W
            keep = yield z_half, f.prox(torch.lerp(half, z_half, 1.0 + 1.0 / alpha), 1.0)
