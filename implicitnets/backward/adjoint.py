"""The adjoint solve shared by the AID backward and the bilevel hypergradients.

Given ``J = ∂₁Φ(w)`` as a :class:`~implicitnets.LinearOperator` and a right-hand side
``g``, solve ``(I − Jᵀ) v = g`` with a :class:`~implicitnets.linear.LinearSolver`.  The
solve runs in at least float32 (a bfloat16/float16 ``g`` is promoted; ``J``'s products
run in the map's own dtype).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linear import LinearInfo, LinearSolver
from ..operator import IdentityMinus, LinearOperator

__all__ = ["solve_adjoint", "adjoint_message", "check_finite"]


def solve_adjoint(
    J: LinearOperator, g: Tensor, linear_solver: LinearSolver, x0: Tensor | None = None
) -> tuple[Tensor, LinearInfo, bool]:
    """``(v, info, finite)`` for ``(I − Jᵀ) v = g``; ``x0`` warm-starts the solve when its
    shape matches ``g``'s (otherwise it is ignored)."""
    work = torch.promote_types(g.dtype, torch.float32)
    b = g.detach().to(work)
    start = x0.detach().to(b) if x0 is not None and x0.shape == b.shape else None
    with torch.no_grad():
        v, info = linear_solver.solve(IdentityMinus(J).T, b, start)
    return v, info, check_finite(v, info)


def check_finite(v: Tensor, info: LinearInfo) -> bool:
    """Whether a linear solve's answer ``v`` and its residual are finite."""
    return math.isfinite(info.residual) and _all_finite(v)


def _all_finite(v: Tensor) -> bool:
    """Whether ``v`` has no NaN/Inf: one reduction, read once (confirmed element-wise only
    when the sum is not finite, which a finite ``v`` can reach by overflow)."""
    return math.isfinite(float(v.sum())) or bool(torch.isfinite(v).all())


def adjoint_message(linear_solver: LinearSolver, info: LinearInfo, finite: bool, where: str) -> str:
    """The description of a failed adjoint solve, naming the solver and its residual."""
    what = "produced NaN/Inf" if not finite else "did not converge"
    return (
        f"{where}: the {type(linear_solver).__name__} solve of (I - J^T) v = g {what} "
        f"(relative residual {info.residual:.3e} after {info.iterations} iterations); "
        "the map may not be a contraction at the fixed point"
    )
