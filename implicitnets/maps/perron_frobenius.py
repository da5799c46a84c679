"""The Perron–Frobenius eigenvalue ``λ_pf(A)`` of a non-negative (sparse) matrix.

For ``A ≥ 0`` the spectral radius ``ρ(A) = λ_pf`` is itself an eigenvalue with a
non-negative eigenvector, and for every positive vector x the Collatz–Wielandt bounds hold:

    min_i (A x)_i / x_i  ≤  λ_pf  ≤  max_i (A x)_i / x_i.

The power iteration on the shifted matrix ``A + I`` (its dominant eigenvalue is
``λ_pf + 1``, strictly dominant even for bipartite graphs, whose spectrum of A is symmetric)
keeps x positive and drives both bounds to ``λ_pf`` for an irreducible A.  The upper bound
is returned, so ``κ / λ_pf`` computed from it never overstates the admissible weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PerronFrobenius", "perron_frobenius"]


@dataclass(frozen=True)
class PerronFrobenius:
    """``upper ≥ λ_pf ≥ lower`` after ``iterations`` products; ``converged`` when
    ``upper − lower ≤ tol · upper``.  ``float(result)`` is the upper bound.

    Args:
        upper: The upper Collatz–Wielandt bound ``max_i (A x)_i / x_i``.
        lower: The lower bound ``min_i (A x)_i / x_i``.
        iterations: Products with ``A`` run.
        converged: Whether ``upper − lower ≤ tol · upper``.
    """

    upper: float
    lower: float
    iterations: int
    converged: bool

    def __float__(self) -> float:
        return self.upper


def perron_frobenius(adjacency: Tensor, *, max_iter: int = 10000, tol: float = 1e-10,
                     check_every: int = 10) -> PerronFrobenius:
    """Collatz–Wielandt bounds on ``λ_pf`` of a square non-negative ``adjacency`` (dense or
    ``torch.sparse``) from a power iteration on ``A + I`` started at the ones vector.

    A reducible matrix (e.g. a disjoint union of graphs with different λ_pf) may leave
    ``lower`` below ``λ_pf`` (``converged = False``); the upper bound stays valid.

    Args:
        adjacency: The square non-negative matrix ``A``, dense or sparse, finite.
        max_iter: Keyword only.  Maximum number of products, an int >= 1.
        tol: Keyword only.  Relative gap ``(upper − lower) / upper`` that stops the
            iteration, a finite number >= 0.
        check_every: Keyword only.  Products between evaluations of the bounds, an
            int >= 1.

    Returns:
        The :class:`PerronFrobenius` bounds.

    Raises:
        ValueError: ``adjacency`` is not square, has negative or non-finite entries, or an
            option is out of range.
    """
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"perron_frobenius: the matrix must be square, got shape {tuple(adjacency.shape)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"perron_frobenius: max_iter must be an int >= 1, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"perron_frobenius: tol must be a finite number >= 0, got {tol!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"perron_frobenius: check_every must be an int >= 1, got {check_every!r}")
    A = adjacency.detach()
    values = A.coalesce().values() if A.is_sparse else A
    if values.numel() and bool((values < 0).any()):
        raise ValueError("perron_frobenius: the matrix has negative entries (λ_pf needs A >= 0)")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("perron_frobenius: the matrix contains NaN or Inf")
    x = torch.ones(A.shape[0], 1, dtype=A.dtype, device=A.device)
    upper, lower, done = math.inf, 0.0, 0
    for done in range(1, max_iter + 1):
        ax = A @ x
        if done % check_every == 0 or done == max_iter:
            ratio = ax / x
            upper, lower = float(ratio.max()), float(ratio.min())
            if upper - lower <= tol * upper:
                return PerronFrobenius(upper, lower, done, True)
        x = ax + x
        x = x / x.max()
    return PerronFrobenius(upper, lower, done, False)
