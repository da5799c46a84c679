"""Restarted GMRES for any non-singular ``A``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..operator import LinearOperator
from .base import (
    LinearInfo,
    LinearSolver,
    MatVec,
    Problem,
    check_options,
    dot,
    flat_mv,
    norm,
    restarted,
    safe_div,
    stop,
)

__all__ = ['GMRES']


def _gmres_cycle(
    mv: MatVec, x: Tensor, r: Tensor, m: int, threshold: float
) -> tuple[Tensor, int]:
    """One GMRES cycle of at most ``m`` Arnoldi steps (modified Gram–Schmidt, Givens)."""
    n, eps = r.numel(), torch.finfo(r.dtype).eps
    V = r.new_zeros(m + 1, n)
    R = r.new_zeros(m + 1, m)  # Hessenberg, rotated into upper triangular in place
    cs, sn = r.new_zeros(m), r.new_zeros(m)
    beta = norm(r)
    V[0] = safe_div(r, beta)
    g = r.new_zeros(m + 1)
    g[0] = beta
    k = m
    for j in range(m):
        w = mv(V[j])
        w_norm0 = norm(w)
        for i in range(j + 1):
            R[i, j] = dot(w, V[i])
            w = w - R[i, j] * V[i]
        h = norm(w)
        # Happy breakdown: w is (numerically) in the Krylov space already.
        h = torch.where(h <= (j + 1) * eps * w_norm0, torch.zeros_like(h), h)
        V[j + 1] = safe_div(w, h)
        R[j + 1, j] = h
        for i in range(j):
            top = cs[i] * R[i, j] + sn[i] * R[i + 1, j]
            R[i + 1, j] = -sn[i] * R[i, j] + cs[i] * R[i + 1, j]
            R[i, j] = top
        denom = torch.hypot(R[j, j], R[j + 1, j])
        cs[j] = torch.where(denom != 0, safe_div(R[j, j], denom), torch.ones_like(denom))
        sn[j] = safe_div(R[j + 1, j], denom)
        R[j, j], R[j + 1, j] = denom, 0.0
        g[j + 1] = -sn[j] * g[j]
        g[j] = cs[j] * g[j]
        if threshold > 0 and stop(g[j + 1].abs(), threshold):
            k = j + 1
            break
    T = R[:k, :k]
    diag = T.diagonal()
    T = T + torch.diag((diag == 0).to(T.dtype))  # zero pivots only after breakdown: y_i = 0
    y = torch.linalg.solve_triangular(T, g[:k, None], upper=True)[:, 0]
    return x + V[:k].T @ y, k


@dataclass(frozen=True)
class GMRES(LinearSolver):
    """Restarted GMRES(``restart``) for ``A x = b``; valid for any non-singular ``A``.

    Minimises ``‖b − A x‖`` over a Krylov space of at most ``restart`` vectors, then
    restarts from the true residual.  ``max_iter`` counts inner (Arnoldi) iterations, one
    matvec each, over all cycles; each cycle adds one matvec for its true residual.
    Memory ``(restart + 1) × numel(b)``.
    """

    max_iter: int = 50
    tol: float = 1e-10
    restart: int = 20

    def __post_init__(self) -> None:
        check_options("GMRES", self.max_iter, self.tol)
        if isinstance(self.restart, bool) or not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES: restart must be an int >= 1, got {self.restart!r}")

    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` with ``matvec(x) = A x``."""
        p = Problem("GMRES", b, x0)
        if (done := p.trivial()) is not None:
            return done

        def inner(mv: MatVec, x: Tensor, r: Tensor, budget: int, threshold: float) -> tuple[Tensor, int]:
            return _gmres_cycle(mv, x, r, min(self.restart, budget), threshold)

        return restarted(inner, flat_mv(op, p), p, self.max_iter, self.tol)
