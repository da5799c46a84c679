"""Richardson iteration on ``(I − Jᵀ) v = b``: the truncated Neumann series of AID-FP."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..operator import LinearOperator
from .base import LinearInfo, LinearSolver, Problem, check_options, flat_mv, norm, stop

__all__ = ['Neumann']


@dataclass(frozen=True)
class Neumann(LinearSolver):
    """Richardson iteration ``x ← x + (b − A x)``, i.e. ``v ← Jᵀ v + b`` for ``A = I − Jᵀ``.

    Valid when the spectral radius of ``I − A`` is below 1; the error contracts by about
    ``‖I − A‖`` per iteration.  From ``x0 = 0``, ``k`` iterations give the truncated
    Neumann series ``Σ_{j<k} (Jᵀ)ʲ b`` — the same as ITD truncated to ``k`` steps at ``w*``.
    ``max_iter`` iterations cost exactly ``max_iter`` matvecs (``+ 1`` with a warm start).
    """

    max_iter: int = 50
    tol: float = 1e-10

    def __post_init__(self) -> None:
        check_options("Neumann", self.max_iter, self.tol)

    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` with ``matvec(x) = A x``."""
        p = Problem("Neumann", b, x0)
        if (done := p.trivial()) is not None:
            return done
        mv, x, threshold = flat_mv(op, p), p.x, self.tol * p.bnorm
        r = p.b - mv(x) if p.warm else p.b.clone()  # always the true residual of x
        used = 0
        while used < self.max_iter:
            if self.tol > 0 and stop(norm(r), threshold, r):
                break
            x = x + r
            r = p.b - mv(x)
            used += 1
        return p.finish(x, r, used, self.tol)
