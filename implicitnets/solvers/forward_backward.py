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

    Args:
        max_iter: Maximum number of map evaluations, an int >= 1.
        tol: Tolerance on the relative residual ``‖Φ(z) − z‖ / ‖Φ(z)‖``, >= 0; ``0`` runs
            exactly ``max_iter`` evaluations.
        alpha: Step size ``α > 0``; converges for ``α < 2m / L²``.
        check_every: Keyword only.  Evaluations between residual checks, an int >= 1 or
            ``None`` (every evaluation when ``tol > 0`` or ``return_best``, else only after
            the last).
        on_failure: Keyword only.  The :class:`~implicitnets.FailurePolicy` of a solve that
            stops above ``tol``.
        freeze_converged: Keyword only.  Stop updating each sample once its own relative
            residual is at most ``tol`` (only when ``tol > 0``).
        return_best: Keyword only.  Return each unconverged sample at its lowest-residual
            iterate and set aside samples that turn NaN/Inf.

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
