"""The chunked fixed-point loop of the compiled path (:class:`~implicitnets.compiled.Compile`).

The solve ``z = g(z)`` by damped iteration ``z ← (1 − β) z + β g(z)`` is cut into chunks
that end where the eager loop tests convergence: after every ``m = check_every``
evaluations and after the last (``m = max_iter`` when ``tol = 0``: one chunk).  A chunk is
one compiled function of ``(g, z)`` that runs its ``n`` evaluations and returns the new
iterate with the per-sample norms ``‖g(z)_b − z_b‖`` and ``‖g(z)_b‖`` of its last
evaluation, computed on the device inside the same graph.  The host then reads the
residual once (only when ``tol > 0``) and stops or runs the next chunk, so the result is
the eager loop's with the same ``check_every``: the same iterate at the same check.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..compiled import Compile
from ..failure import FailurePolicy
from ..state import State, map_parts
from .base import SolverStats
from .monitor import Monitor, check_structure, sample_norms

__all__ = ["chunk", "chunked_solve"]


def chunk(g: Callable[[State], State], z: State, n: int, beta: float, batch: int) -> tuple[State, Tensor, Tensor]:
    """``n`` evaluations of ``z ← (1 − β) z + β g(z)`` from ``z``: the last iterate and the
    per-sample norms ``‖g(z) − z‖``, ``‖g(z)‖`` of the last evaluation (``batch`` samples)."""
    for _ in range(n):
        fz = g(z)
        check_structure(fz, z)
        new = fz if beta == 1.0 else map_parts(lambda a, b: torch.lerp(a.to(b.dtype), b, beta), z, fz)
        prev, z = z, new
    num, den = sample_norms(fz, prev, batch)
    return z, num, den


def chunked_solve(
    name: str, g: Callable[[State], State], z0: State, *, max_iter: int, tol: float, check_every: int | None,
    beta: float, options: Compile, on_failure: FailurePolicy,
) -> tuple[State, SolverStats]:
    """Solve ``z = g(z)`` from ``z0`` chunk by chunk with the compiled :func:`chunk`; the
    statistics and failure handling are the eager loop's (:class:`Monitor`)."""
    monitor = Monitor(name, max_iter, tol, check_every, z0)
    run = options(chunk)
    z, done = z0, 0
    while done < max_iter:
        n = min(monitor.check_every, max_iter - done)
        with warnings.catch_warnings():
            # Dynamo reads ``.grad`` of every tensor it guards on, the map's non-leaf input included
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            z, num, den = run(g, z, n, beta, monitor.batch)
        done += n
        monitor.count = done
        if monitor.record_norms(num, den):
            break
    return monitor.finish(z, on_failure)
