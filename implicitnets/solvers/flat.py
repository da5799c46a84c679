"""The iteration shared by the solvers that keep one flat row per sample (Anderson, Broyden).

Such a solver is a *method* object with the current point ``x`` (a ``(samples, d)`` matrix in
the working dtype, at least float32), ``push(fx)`` (take ``fx = g(x)`` and move ``x`` to the
next point) and ``select(keep)`` (drop the samples that left the active set).
:func:`solve_flat` does the rest: it flattens the state per sample
(:class:`~implicitnets.state.Flattener`), evaluates the map in its own output dtype, runs the
method's bookkeeping outside autocast, records every evaluation in the
:class:`~implicitnets.solvers.monitor.Monitor`, restricts the map to the active samples and
returns ``g`` of the last point with the statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from ..failure import FailurePolicy
from ..state import Flattener, State
from .base import SolverStats
from .monitor import Monitor, check_structure
from .rows import take_rows

__all__ = ["FlatMethod", "FlatOptions", "solve_flat"]


class FlatMethod(Protocol):
    """A method's state: the current point ``x`` of the active samples, one row each."""

    x: Tensor

    def push(self, fx: Tensor) -> None:
        """Take ``fx = g(x)`` and move ``x`` to the next point."""

    def select(self, keep: Tensor) -> None:
        """Keep the samples ``keep`` (rows of the active set)."""


class FlatOptions(Protocol):
    """The options :func:`solve_flat` reads from the solver."""

    max_iter: int
    tol: float
    check_every: int | None
    on_failure: FailurePolicy
    freeze_converged: bool
    return_best: bool


def solve_flat(
    solver: FlatOptions,
    name: str,
    g: Callable[[State], State],
    z0: State,
    method: Callable[[Tensor, bool], FlatMethod],
) -> tuple[State, SolverStats]:
    """Iterate ``method(x0, autograd)`` on ``z0``'s rows; ``solver`` gives ``max_iter``, ``tol``,
    ``check_every``, ``on_failure``, ``freeze_converged`` and ``return_best``."""
    monitor = Monitor(
        name, solver.max_iter, solver.tol, solver.check_every, z0,
        freeze=solver.freeze_converged, best=solver.return_best,
    )
    flat = Flattener(z0)
    rows = isinstance(z0, Tensor) and z0.dim() == 2  # already one row per sample
    fz = g(z0)
    check_structure(fz, z0)
    fx = fz if rows else flat.flatten(fz)
    out_dtype = fx.dtype
    work = torch.promote_types(out_dtype, torch.float32)
    # the bookkeeping runs outside autocast (which would run it in half precision)
    exact = torch.autocast(fx.device.type, enabled=False) if torch.is_autocast_enabled(fx.device.type) else None
    with exact or contextlib.nullcontext():
        state = method((z0 if rows else flat.flatten(z0)).to(work), torch.is_grad_enabled())
    step, check = g, False
    for k in range(solver.max_iter):
        if k > 0:
            x = state.x if work == out_dtype else state.x.to(out_dtype)
            z = x if rows else flat.unflatten(x)
            fz = step(z)
            if check:  # the first evaluation on a new set of samples
                check_structure(fz, z)
                check = False
            fx = fz if rows else flat.flatten(fz)
        stop = monitor.record(fx, state.x, fz)
        if stop or k == solver.max_iter - 1:
            break
        if monitor.keep is not None:  # some samples left the active set
            keep = monitor.keep
            fz, fx, step, check = take_rows(fz, keep), fx.index_select(0, keep), monitor.restrict(g), True
            flat = Flattener(fz)
            state.select(keep)
        if exact is None:
            state.push(fx)
        else:
            with exact:
                state.push(fx)
    return monitor.finish(fz, solver.on_failure)
