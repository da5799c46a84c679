"""Damped (Krasnoselskii–Mann) fixed-point iteration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..options import check_real
from ..state import State, map_parts
from .base import IterativeSolver, SolverStats
from .monitor import Monitor, check_structure
from .rows import take_rows

__all__ = ["FixedPointIteration"]


@dataclass(frozen=True)
class FixedPointIteration(IterativeSolver):
    """Damped fixed-point iteration ``z ← (1 − β) z + β g(z)`` for ``z = g(z)``.

    ``damping`` is β ∈ (0, 1]; β = 1 is plain Picard iteration.  Converges linearly with
    rate q when g is a q-contraction.  Stops when the relative residual is at most ``tol``
    (checked every ``check_every`` evaluations, see :mod:`implicitnets.solvers.monitor`);
    ``tol = 0`` runs exactly ``max_iter`` evaluations.  Non-convergence goes to
    ``on_failure.forward_failed`` (``Warn()`` warns, ``Raise()`` raises).  Works on tensor
    and tuple states part by part; the state takes the dtype of the map's output.

    Per sample (the first axis of every part): ``freeze_converged=True`` stops updating a
    sample once its own relative residual is at most ``tol > 0`` and ends the solve when
    every sample has; a :class:`~implicitnets.BoundMap` ``g`` is then evaluated on the
    active samples only (``g.rows``; the map must be row-separable), a plain callable on
    the full batch.  ``return_best=True`` returns each sample that did not converge at its
    lowest-residual iterate, and sets aside a sample that turns NaN/Inf (at its best finite
    iterate, reported as not converged) instead of raising
    :class:`~implicitnets.NonFiniteError`.  See :class:`SolverStats` for the per-sample
    statistics.

    The options every built-in solver shares (``max_iter``, ``tol``, ``check_every``,
    ``on_failure``, ``freeze_converged``, ``return_best``) are those of
    :class:`~implicitnets.IterativeSolver`.

    Args:
        damping: Damping β in ``(0, 1]``; ``1`` is plain Picard iteration.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("FixedPointIteration", "damping", self.damping, low=0, high=1, low_open=True)

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return the last iterate and its :class:`SolverStats`.

        Args:
            g: The map ``z ↦ Φ(z, u)``, a callable state -> state (a
                :class:`~implicitnets.BoundMap` from the layer).
            z0: The start, a tensor or a tuple of tensors whose first axis is the batch.

        Returns:
            The last iterate (of ``z0``'s structure) and its :class:`SolverStats`.

        Raises:
            ValueError: The map's output is not shaped like its input.
            NonFiniteError: The map produced NaN or Inf (unless ``return_best``).
            ConvergenceError: The solve stopped above ``tol`` and ``on_failure`` is ``Raise()``.
        """
        monitor = Monitor(
            "FixedPointIteration", self.max_iter, self.tol, self.check_every, z0,
            freeze=self.freeze_converged, best=self.return_best,
        )
        z, beta, step = z0, float(self.damping), g
        for k in range(self.max_iter):
            fz = step(z)
            check_structure(fz, z)
            new = fz if beta == 1.0 else map_parts(lambda a, b: torch.lerp(a.to(b.dtype), b, beta), z, fz)
            stop = monitor.record(fz, z, new)
            z = new
            if stop or k == self.max_iter - 1:
                break
            if monitor.keep is not None:  # some samples left the active set
                z, step = take_rows(z, monitor.keep), monitor.restrict(g)
        return monitor.finish(z, self.on_failure)
