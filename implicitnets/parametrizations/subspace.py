"""The largest singular value of a matrix by warm-started subspace iteration.

For ``W`` of shape (m, n) with ``k = min(m, n)``, let ``G`` be the smaller Gram matrix
(``MᵀM`` or ``MMᵀ``, k × k) of ``M``, the matrix scaled to entries in [−1, 1] (so that no
product overflows or underflows); ``G`` is applied by two thin products and never formed.
The iteration keeps an orthonormal block ``X`` of ``b`` columns and repeats

    Q R = G X,    T = Qᵀ G Q,    T = S diag(λ) Sᵀ (λ descending),    X ← Q S,

(subspace iteration with a Rayleigh–Ritz step), so ``λ₁ → σ₁(W)²`` (scaled) at the rate
``(σ_{b+1} / σ₁)²`` per step rather than the plain power iteration's ``(σ₂ / σ₁)²``: a cluster
of up to ``b`` top singular values, typical of a weight trained against a norm bound, no
longer slows it down.  The first estimate is the warm block's own Ritz value, so a weight
that changed by one optimiser step usually needs one step to pass the stopping test.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteError

__all__ = ["BLOCK", "top_singular_subspace"]

BLOCK = 16  # columns of the block: the size of a top cluster that costs no convergence speed


def top_singular_subspace(W: Tensor, X: Tensor, *, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int]:
    """Iterate the block ``X`` (k × b, orthonormal columns; k the smaller side of ``W``) until
    the estimate of ``σ₁(W)`` changes by at most ``tol`` (relative) in one step, or for
    ``max_iter`` steps.  Returns the new block (its first column the top singular vector of
    the smaller side: right when ``W`` is tall or square, left when it is wide), the estimate
    of ``σ₁(W)``, and the number of steps.

    Raises:
        NonFiniteError: ``W`` contains NaN or Inf.
    """
    scale = W.abs().amax()
    if not math.isfinite(float(scale)):
        raise NonFiniteError("the weight contains NaN or Inf")
    M = W / scale.clamp_min(torch.finfo(W.dtype).tiny)
    Mt = M.t()
    if W.shape[0] < W.shape[1]:  # the block lives on the left side: G = M Mᵀ
        M, Mt = Mt, M

    def ritz(Q: Tensor) -> tuple[Tensor, Tensor]:  # eigenpairs of Qᵀ G Q = (M Q)ᵀ (M Q)
        P = M @ Q
        return torch.linalg.eigh(P.t() @ P)

    lam, _ = ritz(X)  # the warm block's estimate, before any step
    previous = float(lam[-1].clamp_min(0).sqrt() * scale)
    steps, sigma = 0, lam[-1].clamp_min(0).sqrt() * scale
    while steps < max_iter:
        Q, _ = torch.linalg.qr(Mt @ (M @ X))  # G X, by two thin products (G itself is never formed)
        lam, S = ritz(Q)
        X = Q @ S.flip(-1)
        sigma = lam[-1].clamp_min(0).sqrt() * scale
        steps += 1
        value = float(sigma)
        if abs(value - previous) <= tol * value:
            break
        previous = value
    return X, sigma, steps
