"""Dense reference solve of ``A x = b`` (small problems)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..operator import LinearOperator
from .base import LinearInfo, LinearSolver, LinearSystem, flat_mv

__all__ = ['Exact']


@dataclass(frozen=True)
class Exact(LinearSolver):
    """Dense solve: builds ``A`` column by column (``numel(b)`` matvecs), ``torch.linalg.solve``.

    The reference for small problems (``numel(b)`` up to a few thousand); ``x0`` is ignored.
    ``converged`` is ``False`` if ``A`` is singular (the pseudo-inverse solution is returned),
    the result is non-finite, or the residual exceeds ``sqrt(eps)`` of ``b``'s dtype.
    """

    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` exactly; ``x0`` is unused.

        See :meth:`LinearSolver.solve` for the arguments and the result.
        """
        p = LinearSystem("Exact", b, None)
        if (done := p.trivial()) is not None:
            return done
        mv, n = flat_mv(op, p), p.b.numel()
        eye = torch.eye(n, dtype=p.b.dtype, device=p.b.device)
        A = torch.stack([mv(eye[i]) for i in range(n)], dim=1)
        try:
            x, singular = torch.linalg.solve(A, p.b), False
        except torch.linalg.LinAlgError:
            x, singular = torch.linalg.pinv(A) @ p.b, True
        x, info = p.finish(x, p.b - A @ x, n, 0.0)
        ok = info.converged and not singular and info.residual <= math.sqrt(torch.finfo(p.b.dtype).eps)
        return x, LinearInfo(info.iterations, info.residual, ok)
