"""Forward–backward splitting for the equilibrium of a monotone map (monDEQ)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..maps.monotone import MonotoneMap
from .splitting import SplittingSolver

__all__ = ["ForwardBackward"]


@dataclass(frozen=True)
class ForwardBackward(SplittingSolver):
    """Forward–backward splitting for ``z = prox(W z + u)`` with ``I − W ⪰ m I``:

        z ← prox_{αf}(z − α((I − W) z − u)) = prox_{αf}((1 − α) z + α (W z + u)).

    Converges linearly for ``0 < α < 2m / L²``, ``L = ‖I − W‖₂`` (with ``m`` the map's
    margin); ``α = 1`` is plain fixed-point iteration.  ``g`` must be a
    :class:`~implicitnets.BoundMap` of a :class:`~implicitnets.maps.MonotoneMap` (else
    ``ValueError``).  Each iteration costs one product with ``W``, from which both the step
    and the map's value ``Φ(z) = prox(W z + u)`` follow; the relative residual
    ``‖Φ(z) − z‖ / ‖Φ(z)‖`` of the map itself stops the solve (``tol``, ``check_every`` and
    ``on_failure`` as in :class:`FixedPointIteration`; ``tol = 0`` runs exactly ``max_iter``
    evaluations), and the solver returns ``Φ`` of its last iterate.  Differentiable
    operations only, so ITD runs through it.

    The options every built-in solver shares (``max_iter``, ``tol``, ``check_every``,
    ``on_failure``, ``freeze_converged``, ``return_best``) are those of
    :class:`~implicitnets.IterativeSolver`.

    Args:
        alpha: Step size ``α > 0``; converges for ``α < 2m / L²``.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    alpha: float = 0.5

    def iterates(self, f: MonotoneMap, z0: Tensor, u: Tensor) -> Generator[tuple[Tensor, Tensor], Tensor | None, None]:
        alpha, z = float(self.alpha), z0
        while True:
            v = f.weight_mv(z) + u
            keep = yield z, f.prox(v, 1.0)
            if keep is not None:
                z, v, u = z[keep], v[keep], u[keep]
            z = f.prox(torch.lerp(z, v, alpha), alpha)
