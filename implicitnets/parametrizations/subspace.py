"""The largest singular value of a linear operator by warm-started subspace iteration.

The operator ``K = scale · M`` (a matrix, a convolution) is given by its products on blocks
of column vectors, ``X ↦ M X`` and ``Y ↦ Mᵀ Y`` (:class:`ScaledOperator`), with ``M`` scaled
so that no product overflows or underflows (a matrix to entries in [−1, 1]).  With the Gram
operator ``G = MᵀM`` (applied by the two products, never formed) the iteration keeps an
orthonormal block ``X`` of ``b`` columns and repeats

    Q R = G X = Mᵀ (M X),    P = M Q,    PᵀP = Qᵀ G Q = S diag(λ) Sᵀ (λ descending),    X ← Q S,

(subspace iteration with a Rayleigh–Ritz step; ``M X = P S`` is carried to the next step, so
a step takes two products), so ``λ₁ → σ₁(K)²`` (scaled) at the rate ``(σ_{b+1} / σ₁)²`` per
step rather than the plain power iteration's ``(σ₂ / σ₁)²``: a cluster of up to ``b`` top singular values, typical of a
weight trained against a norm bound, no longer slows it down.  The first estimate is the
warm block's own Ritz value, so a weight that changed by one optimiser step usually passes
the stopping test after one step.  For a matrix (:func:`matrix_operator`) the block lives
on the smaller side.

:func:`top_singular_subspace` runs to a tolerance, reading the estimate on the host after
every step; :func:`subspace_steps` runs a fixed number of the same steps with no host read
(for code traced by ``torch.compile``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NonFiniteError

__all__ = ["BLOCK", "ScaledOperator", "scaled", "matrix_operator", "top_singular_subspace", "subspace_steps"]

BLOCK = 16  # columns of the block: the size of a top cluster that costs no convergence speed


@dataclass(frozen=True)
class ScaledOperator:
    """``scale · M``: ``apply`` maps a block ``X`` (n × b) to ``M X`` (m × b), ``adjoint`` maps
    ``Y`` (m × b) to ``Mᵀ Y``; ``scale`` is a 0-d tensor.  ``M`` is ``K / scale`` for the
    operator ``K`` whose norm is sought, or ``Kᵀ / scale`` when ``transposed`` (the block then
    holds left singular vectors of ``K``)."""

    apply: Callable[[Tensor], Tensor]
    adjoint: Callable[[Tensor], Tensor]
    scale: Tensor
    transposed: bool = False


def scaled(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale, weight / scale)`` with ``scale = max |wᵢ|`` (0-d; a zero weight stays zero):
    products with the scaled weight neither overflow nor underflow."""
    scale = weight.abs().amax()
    return scale, weight / scale.clamp_min(torch.finfo(weight.dtype).tiny)


def matrix_operator(W: Tensor) -> ScaledOperator:
    """``W`` (2-D) as ``scale · M`` with ``M = W / max |Wᵢⱼ|``, transposed when ``W`` is wide so
    that the block lives on the smaller side (``G`` is the smaller Gram matrix)."""
    scale, M = scaled(W)
    wide = W.shape[0] < W.shape[1]
    if wide:  # the block lives on the left side: G = M Mᵀ
        M = M.t()
    Mt = M.t()
    return ScaledOperator(lambda X: M @ X, lambda Y: Mt @ Y, scale, transposed=wide)


def _sigma(lam: Tensor, scale: Tensor) -> Tensor:
    """The estimate of ``σ₁(K)`` from the Ritz values of the scaled Gram operator."""
    return lam[-1].clamp_min(0).sqrt() * scale


def _ritz(op: ScaledOperator, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The Ritz pairs of ``G`` on ``span Q``: values (ascending), vectors (in ``Q``'s basis),
    and ``P = M Q``, from one product: ``Qᵀ G Q = PᵀP``.  ``PᵀP`` is finite unless the
    operator is not (then ``scale`` carries the NaN into the estimate); ``eigh`` raises on a
    NaN inside its kernel, so a NaN entry enters it as 0."""
    P = op.apply(Q)
    lam, S = torch.linalg.eigh(torch.nan_to_num(P.t() @ P))
    return lam, S, P


def _step(op: ScaledOperator, P: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One subspace step from a block ``X`` given by ``P = M X``: ``G X = Mᵀ P`` orthonormalised
    to ``Q``, and the Rayleigh–Ritz step on ``span Q``.  Returns the new block (Ritz vectors,
    descending), its ``M``-image and its Ritz values (ascending): two products a step."""
    Q, _ = torch.linalg.qr(op.adjoint(P))
    lam, S, PQ = _ritz(op, Q)
    S = S.flip(-1)
    return Q @ S, PQ @ S, lam


def top_singular_subspace(op: ScaledOperator, X: Tensor, *, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int]:
    """Iterate the block ``X`` (n × b, orthonormal columns, n the size of ``M``'s input) until
    the estimate of ``σ₁(K)`` changes by at most ``tol`` (relative) in one step, or for
    ``max_iter`` steps.  Returns the new block (its first column the top right singular
    vector of ``M``), the estimate of ``σ₁(K)``, and the number of steps.  Reads the host
    once per step.

    Raises:
        NonFiniteError: The operator's weight contains NaN or Inf (``scale`` is not finite).
    """
    if not math.isfinite(float(op.scale)):
        raise NonFiniteError("the weight contains NaN or Inf")
    lam, _, P = _ritz(op, X)  # the warm block's estimate, before any step
    sigma, steps = _sigma(lam, op.scale), 0
    previous = float(sigma)
    while steps < max_iter:
        X, P, lam = _step(op, P)
        sigma = _sigma(lam, op.scale)
        steps += 1
        value = float(sigma)
        if abs(value - previous) <= tol * value:
            break
        previous = value
    return X, sigma, steps


def subspace_steps(op: ScaledOperator, X: Tensor, steps: int = 1) -> tuple[Tensor, Tensor]:
    """``steps`` steps of the iteration of :func:`top_singular_subspace` from the block ``X``,
    with no stopping test and no host read.  Returns the new block and the estimate of
    ``σ₁(K)``.  A NaN or Inf in the weight is not detected: it propagates into both."""
    lam, _, P = _ritz(op, X)
    for _ in range(steps):
        X, P, lam = _step(op, P)
    return X, _sigma(lam, op.scale)
