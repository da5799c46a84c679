"""Restarted GMRES for any non-singular ``A``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..operator import LinearOperator
from ..options import check_int
from ..transforms import read
from .base import LinearInfo, LinearSolver, LinearSystem, MatVec, check_options, flat_mv, norm, restarted

__all__ = ['GMRES']


class _HessenbergLeastSquares:
    """``min ‖β e₁ − H y‖`` for an upper Hessenberg ``H`` given column by column, by Givens
    rotations on the host (float64; ``H`` is at most ``restart + 1`` by ``restart``).

    A column is given as the Gram–Schmidt coefficients of ``A v_j`` (two passes, ``h`` and
    ``h'``, summed here) and the norm of what is left.  That norm below ``(j + 1)·eps`` of
    ``‖A v_j‖`` (``‖A v_j‖² = ‖h + h'‖² + rest²``) is a happy breakdown: the Krylov space
    is invariant, the least-squares residual is zero, and later columns are ignored.
    """

    def __init__(self, beta: float, eps: float) -> None:
        self.R: list[list[float]] = []  # the rotated columns: upper triangular
        self.cs: list[float] = []
        self.sn: list[float] = []
        self.g = [beta]
        self.eps = eps
        self.broken = False

    def add(self, first: list[float], second: list[float], rest: float) -> float:
        """Append column ``j``; returns the least-squares residual."""
        if self.broken:
            return 0.0
        j = len(self.R)
        col = [a + b for a, b in zip(first, second)]
        if not rest > (j + 1) * self.eps * math.sqrt(math.fsum(c * c for c in col) + rest * rest):
            rest, self.broken = (0.0, True) if math.isfinite(rest) else (rest, False)
        col.append(rest)
        for i in range(j):
            c, s = self.cs[i], self.sn[i]
            col[i], col[i + 1] = c * col[i] + s * col[i + 1], -s * col[i] + c * col[i + 1]
        d = math.hypot(col[j], col[j + 1])
        c, s = (col[j] / d, col[j + 1] / d) if d != 0 else (1.0, 0.0)
        col[j] = d
        self.R.append(col[: j + 1])
        self.cs.append(c)
        self.sn.append(s)
        self.g[j:] = [c * self.g[j], -s * self.g[j]]
        return abs(self.g[j + 1])

    def solve(self) -> list[float]:
        """``y`` by back substitution (a zero pivot gives ``y_i = 0``)."""
        k = len(self.R)
        y = [0.0] * k
        for i in range(k - 1, -1, -1):
            pivot = self.R[i][i]
            if pivot != 0:
                y[i] = (self.g[i] - sum(self.R[m][i] * y[m] for m in range(i + 1, k))) / pivot
        return y


def _gmres_cycle(mv: MatVec, x: Tensor, r: Tensor, m: int, threshold: float) -> tuple[Tensor, int]:
    """One GMRES cycle of at most ``m`` Arnoldi steps from the residual ``r`` of ``x``.

    Each step orthogonalises ``A v_j`` against the basis by classical Gram–Schmidt run
    twice (two matrix–vector products with the basis instead of ``j`` dot products; as
    accurate as modified Gram–Schmidt).  The small least-squares problem is solved on the
    host (:class:`_HessenbergLeastSquares`): once at the end when ``threshold = 0`` (one
    synchronisation per cycle), or step by step to test its residual against ``threshold``.
    After a happy breakdown the remaining steps (``threshold = 0``) run on a vector of no
    consequence: the solution uses the basis up to the breakdown.
    """
    tiny = torch.finfo(r.dtype).tiny
    V = r.new_empty(m + 1, r.numel())
    beta = norm(r)
    torch.div(r, beta.clamp_min(tiny), out=V[0])
    columns: list[Tensor] = []
    ls = _HessenbergLeastSquares(read(beta), torch.finfo(r.dtype).eps) if threshold > 0 else None
    for j in range(m):
        w = mv(V[j])
        basis = V[: j + 1]
        h = basis @ w
        w = torch.addmv(w, basis.T, h, alpha=-1)
        h2 = basis @ w
        w = torch.addmv(w, basis.T, h2, alpha=-1)
        rest = norm(w)
        torch.div(w, rest.clamp_min(tiny), out=V[j + 1])
        columns.append(torch.cat([h, h2, rest.view(1)]))
        if ls is not None:
            values = read(columns[-1])
            if not ls.add(values[: j + 1], values[j + 1: -1], values[-1]) > threshold:  # also stops on NaN
                break
    if ls is None:
        flat = read(torch.cat([beta.view(1), *columns]))  # the one host sync of the cycle
        ls, offset = _HessenbergLeastSquares(flat[0], torch.finfo(r.dtype).eps), 1
        for j in range(len(columns)):
            ls.add(flat[offset: offset + j + 1], flat[offset + j + 1: offset + 2 * j + 2], flat[offset + 2 * j + 2])
            offset += 2 * j + 3
    y = torch.tensor(ls.solve(), dtype=r.dtype, device=r.device)
    return torch.addmv(x, V[: len(y)].T, y), len(columns)


@dataclass(frozen=True)
class GMRES(LinearSolver):
    """Restarted GMRES(``restart``) for ``A x = b``; valid for any non-singular ``A``.

    Minimises ``‖b − A x‖`` over a Krylov space of at most ``restart`` vectors, then
    restarts from the true residual.  ``max_iter`` counts inner (Arnoldi) iterations, one
    matvec each, over all cycles; each cycle adds one matvec for its true residual.
    Memory ``(restart + 1) × numel(b)``.  With ``tol = 0`` the host synchronises once per
    cycle (for the small least-squares problem), with ``tol > 0`` once per iteration.

    Args:
        max_iter: Maximum number of inner (Arnoldi) iterations over all cycles, an int >= 1.
        tol: Tolerance on the relative residual ``‖b − A x‖ / ‖b‖``, >= 0; ``0`` runs exactly
            ``max_iter`` iterations.
        restart: Krylov vectors per cycle, an int >= 1.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    max_iter: int = 50
    tol: float = 1e-10
    restart: int = 20

    def __post_init__(self) -> None:
        check_options("GMRES", self.max_iter, self.tol)
        check_int("GMRES", "restart", self.restart)

    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` with ``matvec(x) = A x``.

        See :meth:`LinearSolver.solve` for the arguments and the result.
        """
        p = LinearSystem("GMRES", b, x0, defer=self.tol == 0)
        if (done := p.trivial()) is not None:
            return done

        def inner(mv: MatVec, x: Tensor, r: Tensor, budget: int, threshold: float) -> tuple[Tensor, int]:
            return _gmres_cycle(mv, x, r, min(self.restart, budget), threshold)

        return restarted(inner, flat_mv(op, p), p, self.max_iter, self.tol)
