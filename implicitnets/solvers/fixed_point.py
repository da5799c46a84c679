"""Damped (Krasnoselskii–Mann) fixed-point iteration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..compiled import Compile, use_compiled
from ..options import check_instance, check_real
from ..state import State, map_parts, parts
from .base import IterativeSolver, SolverStats
from .chunked import chunked_solve
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

    ``compile=Compile()`` runs the evaluations between two stopping tests (all
    ``max_iter`` when ``tol = 0``) as one ``torch.compile``-d function and tests
    convergence once per chunk of ``check_every`` evaluations (see
    :mod:`implicitnets.solvers.chunked`); it does not combine with the per-sample options.

    Args:
        damping: Damping β in ``(0, 1]``; ``1`` is plain Picard iteration.
        compile: Keyword only.  A :class:`~implicitnets.Compile` to run the loop compiled, or
            ``None`` (eager).

    Raises:
        ValueError: An option is out of range or of the wrong type, or ``compile`` is given
            with ``freeze_converged`` or ``return_best``.
    """

    damping: float = 1.0
    compile: Compile | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("FixedPointIteration", "damping", self.damping, low=0, high=1, low_open=True)
        if self.compile is not None:
            check_instance("FixedPointIteration", "compile", self.compile, Compile, "Compile()")
            if self.freeze_converged or self.return_best:
                raise ValueError(
                    "FixedPointIteration: compile does not combine with freeze_converged or return_best "
                    "(their active set changes the shapes between chunks); leave one of them out"
                )

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
        if use_compiled(self.compile, parts(z0)[0]):
            return chunked_solve(
                "FixedPointIteration", g, z0, max_iter=self.max_iter, tol=self.tol, check_every=self.check_every,
                beta=float(self.damping), options=self.compile, on_failure=self.on_failure,
            )
        monitor = Monitor(
            "FixedPointIteration", self.max_iter, self.tol, self.check_every, z0,
            freeze=self.freeze_converged, best=self.return_best,
        )
        z, beta, step = z0, float(self.damping), g
        for k in range(self.max_iter):
            fz = step(z)
            if k == 0:  # later inputs have the shapes of this output
                check_structure(fz, z)
            new = fz if beta == 1.0 else map_parts(lambda a, b: torch.lerp(a.to(b.dtype), b, beta), z, fz)
            stop = monitor.record(fz, z, new)
            z = new
            if stop or k == self.max_iter - 1:
                break
            if monitor.keep is not None:  # some samples left the active set
                z, step = take_rows(z, monitor.keep), monitor.restrict(g)
        return monitor.finish(z, self.on_failure)
