"""The forward-solver protocol and the statistics every solve returns."""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ..backward_stats import BackwardStats
from ..failure import FailurePolicy, Warn
from ..options import check_bool, check_instance, check_int, check_real
from ..state import State

__all__ = ["ForwardSolver", "IterativeSolver", "SolverStats"]


@dataclass
class SolverStats:
    """What one solve did; the backward pass fills the ``backward_*`` fields.

    ``iterations`` counts map evaluations, ``residual`` is the relative residual
    ``‖g(z) − z‖ / ‖g(z)‖`` of the whole batch at the last check, ``trace`` the residuals
    at every check.  ``converged`` says whether the whole forward solve reached its
    tolerance (always true for ``tol = 0``, which asks for exactly ``max_iter``
    evaluations; with ``freeze_converged`` or ``return_best``: whether every sample did).

    Per sample (detached tensors of shape ``(batch,)`` on the state's device, filled by
    the built-in solvers): ``sample_residual`` is each sample's relative residual
    ``‖g(z)_b − z_b‖ / ‖g(z)_b‖`` at its last check (with ``return_best``, that of the
    iterate returned; ``inf`` when no finite one was seen), ``sample_converged`` whether it
    is at most ``tol`` (and finite), ``sample_iterations`` the map evaluations that updated
    it (fewer than ``iterations`` for a sample frozen early).

    ``backward`` holds the statistics of the backward pass through this solve
    (:class:`~implicitnets.BackwardStats`), which the backward mode fills in; the solver
    itself never touches them.

    Args:
        iterations: Map evaluations of the solve.
        residual: Relative residual of the whole batch at the last check (``nan`` before any).
        converged: Whether the solve reached its tolerance.
        trace: Relative residual of the whole batch at every check.
        sample_residual: Relative residual per sample, shape ``(batch,)``, or ``None``.
        sample_converged: Whether each sample's residual is at most ``tol`` and finite, a
            bool tensor of shape ``(batch,)``, or ``None``.
        sample_iterations: Map evaluations that updated each sample, shape ``(batch,)``, or
            ``None``.
        backward: Statistics of the backward pass (:class:`~implicitnets.BackwardStats`).
    """

    iterations: int = 0
    residual: float = math.nan
    converged: bool = False
    trace: list[float] = field(default_factory=list)
    sample_residual: Tensor | None = field(default=None, repr=False)
    sample_converged: Tensor | None = field(default=None, repr=False)
    sample_iterations: Tensor | None = field(default=None, repr=False)
    backward: BackwardStats = field(default_factory=BackwardStats)


class ForwardSolver(abc.ABC):
    """Solves ``z = g(z)`` from ``z0``; subclass it to plug in your own solver.

    ``g`` is any callable state -> state; the layer passes a
    :class:`~implicitnets.BoundMap` (``g.map`` the map object, ``g.u`` the injected input,
    ``g.rows(index)`` the map on some samples), which a structure-aware solver may use.

    ``solve`` must return the last iterate (a state of ``z0``'s structure; computed from
    ``g``'s outputs so that ITD can differentiate through it) and a :class:`SolverStats`.
    Under ``torch.no_grad`` (AID, JacobianFree) it may work in place.  ``max_iter`` and
    ``tol`` are read by :class:`~implicitnets.ITD` when it truncates, ``on_failure``
    when the whole truncated solve misses ``tol``; a solver that
    is not a dataclass with those fields overrides :meth:`with_budget`.
    """

    max_iter: int
    tol: float
    #: what a solve that stops above ``tol`` does (the built-ins take it as a field)
    on_failure: FailurePolicy = Warn()

    @abc.abstractmethod
    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0`` towards a fixed point of ``g``.

        Args:
            g: The map ``z ↦ Φ(z, u)``, a callable state -> state (from the layer, a
                :class:`~implicitnets.BoundMap`).
            z0: The start, a tensor or a tuple of tensors whose first axis is the batch.

        Returns:
            The last iterate (a state of ``z0``'s structure) and its :class:`SolverStats`.
        """

    def with_budget(self, max_iter: int, tol: float) -> ForwardSolver:
        """A copy that runs at most ``max_iter`` evaluations with tolerance ``tol`` and
        reports (does not warn about or raise for) non-convergence.

        Args:
            max_iter: Maximum number of map evaluations of the copy.
            tol: Relative-residual tolerance of the copy; ``0`` runs exactly ``max_iter``.

        Returns:
            The copy, with ``on_failure=Warn()`` when the solver has that field.

        Raises:
            NotImplementedError: The solver is not a dataclass and does not override this.
        """
        if not dataclasses.is_dataclass(self):
            raise NotImplementedError(
                f"{type(self).__name__}.with_budget: override it to let ITD(truncate=K) split the solve"
            )
        changes: dict[str, object] = {"max_iter": max_iter, "tol": tol}
        if any(f.name == "on_failure" for f in dataclasses.fields(self)):
            changes["on_failure"] = Warn()
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class IterativeSolver(ForwardSolver):
    """The options every built-in solver shares, declared and validated once.

    ``max_iter`` (map evaluations) and ``tol`` (relative residual; ``0`` runs exactly
    ``max_iter``) come first and may be given by position; the rest are keywords:
    ``check_every`` (evaluations between stopping tests; ``None``: every one when
    ``tol > 0``), ``on_failure`` (what a solve that misses ``tol`` does),
    ``freeze_converged`` and ``return_best`` (per-sample control, see
    :class:`~implicitnets.FixedPointIteration`).  Subclasses add their own options between
    ``tol`` and these, and validate them in ``__post_init__`` after calling this one.

    Args:
        max_iter: Maximum number of map evaluations, an int >= 1.
        tol: Tolerance on the relative residual ``‖g(z) − z‖ / ‖g(z)‖``, >= 0; ``0`` runs
            exactly ``max_iter`` evaluations.
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

    max_iter: int = 50
    tol: float = 1e-5
    check_every: int | None = field(default=None, kw_only=True)
    on_failure: FailurePolicy = field(default=Warn(), kw_only=True)
    freeze_converged: bool = field(default=False, kw_only=True)
    return_best: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_int(name, "max_iter", self.max_iter)
        check_real(name, "tol", self.tol, low=0)
        check_int(name, "check_every", self.check_every, optional=True)
        check_instance(name, "on_failure", self.on_failure, FailurePolicy, "Warn(), Raise()")
        check_bool(name, "freeze_converged", self.freeze_converged)
        check_bool(name, "return_best", self.return_best)
