"""Spectral norm ‖∂₁Φ(z, x)‖₂ at a point by batched power iteration on ``JᵀJ``.

‖J‖₂ < 1 at the fixed point means Φ(·, x) is a contraction near ``w*`` *in one step*: the
fixed-point iteration and the AID fixed-point/Neumann backward both converge locally, at a
rate no worse than ‖J‖₂ per step.

Power iteration ``v ← JᵀJ v / ‖JᵀJ v‖`` converges to the top right-singular vector at the
rate ``(σ₂/σ₁)²``; the estimate ``σ = ‖J v‖`` (unit ``v``) is a Rayleigh quotient of the
symmetric ``JᵀJ``, so it is always a *lower* bound of ‖J‖₂ and its error shrinks like
``(σ₂/σ₁)⁴ᵏ``.  Each iteration costs one ``J v`` and one ``Jᵀu`` per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..maps.jacobian import linearize
from ._flat import flat_operators, random_rows
from .spectral_estimate import SpectralEstimate

__all__ = ["jacobian_spectral_norm"]


def jacobian_spectral_norm(
    f: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    x: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
) -> SpectralEstimate:
    """Estimate ``σ_max(∂₁Φ(z, x))`` per sample (block-diagonal J) and its worst case.

    Stops when every sample's estimate changes by at most ``tol`` relatively between two
    iterations (``tol=0`` runs ``max_iter`` iterations).  ``per_sample=False`` treats the
    whole batch as one vector (for maps that mix samples).  ``generator`` seeds the start.

    Args:
        f: The map ``f(w, x) -> w`` (its closed-form ``jacobian`` is used when it has
            ``inject``/``step`` and one).
        z: The point ``z`` (typically the fixed point ``w*``), shape (batch, ...).
        x: The map's input.
        max_iter: Keyword only.  Maximum number of power iterations, an int >= 1.
        tol: Keyword only.  Relative change of the estimate that stops the iteration, >= 0.
        per_sample: Keyword only.  One estimate per sample (block-diagonal ``J``); ``False``
            treats the batch as one vector.
        generator: Keyword only.  The random generator of the start, or ``None``.

    Returns:
        The :class:`SpectralEstimate` (a lower bound of ``‖J‖₂`` per sample).

    Raises:
        ValueError: ``max_iter`` or ``tol`` is out of range.
        NonFiniteError: ``J v`` is NaN or Inf.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"jacobian_spectral_norm: max_iter must be an int >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"jacobian_spectral_norm: tol must be a number >= 0, got {tol!r}")
    lin = linearize(f, z, x)
    n, d, matvec, rmatvec = flat_operators(lin, per_sample)
    tiny = torch.finfo(z.dtype).tiny
    V = random_rows(n, d, z, generator)
    sigma = torch.full((n,), float("nan"), dtype=z.dtype, device=z.device)
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (read after the loop)
        JV = matvec(V)
        new = torch.linalg.vector_norm(JV, dim=1)
        if not torch.isfinite(new).all():
            raise NonFiniteError("jacobian_spectral_norm: J v is NaN/Inf")
        W = rmatvec(JV)
        wn = torch.linalg.vector_norm(W, dim=1, keepdim=True)
        V = torch.where(wn > tiny, W / wn.clamp_min(tiny), V)  # J = 0 on a sample: keep v
        change = (new - sigma).abs() <= tol * new.clamp_min(tiny)
        sigma = new
        if tol > 0 and bool(change.all()):
            converged = True
            break
    return SpectralEstimate(sigma, float(sigma.max()), iterations, converged)
