"""Iterative differentiation (ITD): reverse mode through the forward solver's iterations."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import ConvergenceWarning
from ..options import check_int
from ..solvers import SolverStats
from ..state import State
from .base import BackwardMode, Problem

__all__ = ["ITD"]


@dataclass(frozen=True)
class ITD(BackwardMode):
    """Iterative differentiation: backpropagate through the forward solver's iterations.

    ``truncate=None`` keeps the whole graph (memory O(t·d)).  ``truncate=K`` runs the first
    ``max_iter − K`` iterations without autograd (stopping at ``tol``), then exactly K
    differentiable iterations of the same solver (Shaban et al. 2019); ``stats.converged``
    then says whether the whole solve reached ``tol``.  From a converged ``w*`` this equals
    AID with ``linear.Neumann(max_iter=K)``.  Its derivatives of every order are those of the
    unrolled iterations (of the last K, from a constant start, when truncated).  ITD composes
    with ``torch.func`` transforms when the solver is written in differentiable operations
    (the built-ins are); inside ``vmap`` a solver with ``tol > 0`` stops when every mapped
    problem has converged (their joint residual), so it may run more iterations than a loop.

    Args:
        truncate: Number ``K`` of differentiable final iterations, an int >= 1, or ``None``
            to differentiate through all of them.  ``K >= max_iter`` keeps the whole graph.

    Raises:
        ValueError: ``truncate`` is neither ``None`` nor an int >= 1.
    """

    truncate: int | None = None

    def __post_init__(self) -> None:
        check_int("ITD", "truncate", self.truncate, optional=True)

    def run(self, problem: Problem) -> tuple[State, SolverStats]:
        solver, g = problem.solver, problem.map()
        K = self.truncate
        if not problem.needs_grad or K is None or K >= solver.max_iter:
            return solver.solve(g, problem.z0)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            z, head = solver.with_budget(solver.max_iter - K, solver.tol).solve(g, problem.z0)
        z, tail = solver.with_budget(K, 0.0).solve(g, z)
        converged = solver.tol == 0 or tail.residual <= solver.tol
        per_sample = {}
        if tail.sample_residual is not None:
            with torch.no_grad():
                done = tail.sample_residual <= solver.tol if solver.tol > 0 else torch.ones_like(tail.sample_converged)
            iterations = tail.sample_iterations
            if head.sample_iterations is not None:
                iterations = iterations + head.sample_iterations
            per_sample = dict(sample_residual=tail.sample_residual, sample_converged=done, sample_iterations=iterations)
        stats = SolverStats(head.iterations + tail.iterations, tail.residual, converged, head.trace + tail.trace,
                            **per_sample)
        if not converged:
            solver.on_failure.forward_failed(
                f"{type(solver).__name__} did not converge: relative residual {tail.residual:.3e} > tol "
                f"{solver.tol:.1e} after {stats.iterations} iterations (ITD truncated to the last {K})"
            )
        return z, stats
