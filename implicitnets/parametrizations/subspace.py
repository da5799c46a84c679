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

:func:`top_singular_subspace` runs to a tolerance, reading the estimate on the host after
every step; :func:`subspace_steps` runs a fixed number of the same steps with no host read
(for code traced by ``torch.compile``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteError

__all__ = ["BLOCK", "top_singular_subspace", "subspace_steps"]

BLOCK = 16  # columns of the block: the size of a top cluster that costs no convergence speed


def _scaled(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(M, Mᵀ, scale)`` with ``M = W / max |Wᵢⱼ|``, the sides swapped when ``W`` is wide so
    that ``G = Mᵀ M`` is always the smaller Gram matrix."""
    scale = W.abs().amax()
    M = W / scale.clamp_min(torch.finfo(W.dtype).tiny)
    Mt = M.t()
    if W.shape[0] < W.shape[1]:  # the block lives on the left side: G = M Mᵀ
        M, Mt = Mt, M
    return M, Mt, scale


def _ritz(M: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs (ascending) of ``Qᵀ G Q = (M Q)ᵀ (M Q)``.  Its entries are finite unless
    ``W`` is not (then ``scale`` carries the NaN into the estimate); ``eigh`` raises on a NaN
    inside its kernel, so a NaN entry enters it as 0."""
    P = M @ Q
    return torch.linalg.eigh(torch.nan_to_num(P.t() @ P))


def _sigma(lam: Tensor, scale: Tensor) -> Tensor:
    """The estimate of ``σ₁(W)`` from the Ritz values of the scaled Gram matrix."""
    return lam[-1].clamp_min(0).sqrt() * scale


def _step(M: Tensor, Mt: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """One subspace step with its Rayleigh–Ritz step: the new block (Ritz vectors, descending)
    and its Ritz values (ascending)."""
    Q, _ = torch.linalg.qr(Mt @ (M @ X))  # G X, by two thin products (G itself is never formed)
    lam, S = _ritz(M, Q)
    return Q @ S.flip(-1), lam


def top_singular_subspace(W: Tensor, X: Tensor, *, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int]:
    """Iterate the block ``X`` (k × b, orthonormal columns; k the smaller side of ``W``) until
    the estimate of ``σ₁(W)`` changes by at most ``tol`` (relative) in one step, or for
    ``max_iter`` steps.  Returns the new block (its first column the top singular vector of
    the smaller side: right when ``W`` is tall or square, left when it is wide), the estimate
    of ``σ₁(W)``, and the number of steps.  Reads the host once per step.

    Raises:
        NonFiniteError: ``W`` contains NaN or Inf.
    """
    M, Mt, scale = _scaled(W)
    if not math.isfinite(float(scale)):
        raise NonFiniteError("the weight contains NaN or Inf")
    lam, _ = _ritz(M, X)  # the warm block's estimate, before any step
    sigma = _sigma(lam, scale)
    previous, steps = float(sigma), 0
    while steps < max_iter:
        X, lam = _step(M, Mt, X)
        sigma = _sigma(lam, scale)
        steps += 1
        value = float(sigma)
        if abs(value - previous) <= tol * value:
            break
        previous = value
    return X, sigma, steps


def subspace_steps(W: Tensor, X: Tensor, steps: int = 1) -> tuple[Tensor, Tensor]:
    """``steps`` steps of the iteration of :func:`top_singular_subspace` from the block ``X``,
    with no stopping test and no host read.  Returns the new block and the estimate of
    ``σ₁(W)``.  A NaN or Inf in ``W`` is not detected: it propagates into both."""
    M, Mt, scale = _scaled(W)
    for _ in range(steps):
        X, lam = _step(M, Mt, X)
    return X, _sigma(lam, scale)
