"""Residual bookkeeping shared by the built-in forward solvers.

The relative residual ``‖g(z) − z‖ / max(‖g(z)‖, tiny)`` over the whole batch (all parts
of a tuple state) is computed only at the *checks*: every ``check_every`` evaluations and
after the last.  ``check_every=None`` means every evaluation when ``tol > 0`` and only after
the last when ``tol = 0``.  Residuals stay on the device; the host synchronises at the
stopping checks (none when ``tol = 0``) and once at the end.  Norms are accumulated in at
least float32, whatever the state's dtype (bfloat16 or float16 under autocast).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..failure import FailurePolicy
from ..state import State, parts
from .base import SolverStats

__all__ = ["Monitor", "check_common", "check_structure", "relative_residual"]


def check_common(name: str, max_iter: int, tol: float, check_every: int | None, on_failure: object) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{name}: max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{name}: tol must be a finite number >= 0, got {tol!r}")
    if check_every is not None and (
        isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
    ):
        raise ValueError(f"{name}: check_every must be None or an int >= 1, got {check_every!r}")
    if not isinstance(on_failure, FailurePolicy):
        raise ValueError(f"{name}: on_failure must be a FailurePolicy (e.g. Warn(), Raise()), got {on_failure!r}")


def check_structure(fz: State, z: State) -> None:
    """The map's output must be a state of the same structure and shapes as its input."""
    a, b = parts(fz), parts(z)
    if isinstance(fz, Tensor) != isinstance(z, Tensor) or len(a) != len(b) or any(
        x.shape != y.shape for x, y in zip(a, b)
    ):
        raise ValueError(
            f"the map's output {[tuple(t.shape) for t in a]} does not match the state "
            f"{[tuple(t.shape) for t in b]} it was given; a fixed-point map must return a state "
            "shaped like w (pass z0 of the right shape or give the map an initial_state(x) method)"
        )


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def relative_residual(fz: State, z: State) -> Tensor:
    """``‖fz − z‖ / max(‖fz‖, tiny)`` over all parts, as a 0-D tensor in ≥ float32."""
    with torch.no_grad():
        a, b = parts(fz), parts(z)
        dtype = _work_dtype(a[0])
        num = sum(torch.linalg.vector_norm(x.to(dtype) - y.to(dtype)).square() for x, y in zip(a, b))
        den = sum(torch.linalg.vector_norm(x, dtype=dtype).square() for x in a)
        return num.sqrt() / den.sqrt().clamp_min(torch.finfo(dtype).tiny)


class Monitor:
    """Counts evaluations, stores residuals at the checks, decides when to stop."""

    def __init__(self, name: str, max_iter: int, tol: float, check_every: int | None, like: State):
        if check_every is None:
            check_every = 1 if tol > 0 else max_iter
        self.name, self.max_iter, self.tol, self.check_every = name, max_iter, tol, check_every
        checks = -(-max_iter // check_every) + 1
        first = parts(like)[0]
        self.buffer = torch.full((checks,), math.nan, dtype=_work_dtype(first), device=first.device)
        self.count = 0  # map evaluations
        self.checks = 0  # residuals stored

    def record(self, fz: State, z: State) -> bool:
        """Count one evaluation ``fz = g(z)``; at a check store its relative residual and
        return True when the solve should stop."""
        self.count += 1
        if self.count % self.check_every and self.count != self.max_iter:
            return False
        r = relative_residual(fz, z)
        self.buffer[self.checks] = r
        self.checks += 1
        if not self.tol > 0:
            return False
        value = float(r)
        if not math.isfinite(value):
            raise NonFiniteError(
                f"{self.name}: the map produced NaN/Inf (relative residual {value}) at "
                f"iteration {self.count}; the map may be expansive (not a contraction)"
            )
        return value <= self.tol

    def finish(self, policy: FailurePolicy) -> SolverStats:
        trace = self.buffer[: self.checks].tolist()
        residual = trace[-1] if trace else math.nan
        if not math.isfinite(residual):
            raise NonFiniteError(
                f"{self.name}: the map produced NaN/Inf (relative residual {residual}) "
                f"within {self.count} iterations; the map may be expansive"
            )
        converged = self.tol == 0 or residual <= self.tol
        stats = SolverStats(self.count, residual, converged, trace)
        if not converged:
            policy.forward_failed(
                f"{self.name} did not converge: relative residual {residual:.3e} > tol "
                f"{self.tol:.1e} after {self.count} iterations"
            )
        return stats
