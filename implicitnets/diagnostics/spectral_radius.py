"""Spectral radius ρ(∂₁Φ(z, x)) at a point by batched Arnoldi (Krylov–Hessenberg eigenvalues).

ρ(J) < 1 is what decides *asymptotic* local convergence of the fixed-point iteration at
``w*`` and the solvability of the AID system ``(I − Jᵀ) v = g`` by the Neumann series
(``linear.Neumann``); ρ(J) ≤ ‖J‖₂, with equality for normal J only.

Why not plain power iteration on J: for a non-symmetric J the dominant eigenvalue may be a
complex pair (power iteration then oscillates forever) or have a near-equal competitor
(convergence at rate |λ₂/λ₁|, arbitrarily slow), and ‖Jᵏv‖^{1/k} converges only like
``C^{1/k}``.  Instead ``k`` steps of Arnoldi build an orthonormal Krylov basis ``Q`` with
``J Q_k = Q_{k+1} H_k``; the eigenvalues of the small Hessenberg ``H_k`` (Ritz values,
complex allowed) approximate the outer eigenvalues of J and are exact once ``k = d``
(the sample's dimension).  Careful: for a strongly non-normal J a Ritz value may exceed
ρ(J) in modulus before convergence (Ritz values lie in the field of values, not the
spectrum); use ``krylov_dim`` large enough and check ``converged``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..maps.jacobian import linearize
from ._flat import flat_operators, random_rows
from .spectral_estimate import SpectralEstimate

__all__ = ["jacobian_spectral_radius"]


def _orthogonalize(Q: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram–Schmidt twice (CGS2) of rows ``w`` against the rows' bases ``Q``."""
    h = torch.zeros(Q.shape[0], Q.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(2):
        c = torch.einsum("njd,nd->nj", Q, w)
        w = w - torch.einsum("nj,njd->nd", c, Q)
        h = h + c
    return w, h


def jacobian_spectral_radius(
    f: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    x: Tensor,
    *,
    krylov_dim: int = 30,
    tol: float = 1e-6,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
) -> SpectralEstimate:
    """Estimate ``ρ(∂₁Φ(z, x)) = max |λ|`` per sample (block-diagonal J) and its worst case.

    Runs at most ``min(krylov_dim, d)`` Arnoldi steps per sample and returns the largest
    Ritz-value modulus.  Stops early when every sample's estimate changes by at most
    ``tol`` relatively between two steps, or at an invariant subspace (then the Ritz values
    are exact eigenvalues); reaching ``k = d`` is exact too.  ``per_sample=False`` treats
    the whole batch as one vector.

    Args:
        f: The map ``f(w, x) -> w`` (its closed-form ``jacobian`` is used when it has
            ``inject``/``step`` and one).
        z: The point ``z`` (typically the fixed point ``w*``), shape (batch, ...).
        x: The map's input.
        krylov_dim: Keyword only.  Maximum number of Arnoldi steps k, an int >= 1.
        tol: Keyword only.  Relative change of the estimate that stops the iteration, >= 0.
        per_sample: Keyword only.  One estimate per sample (block-diagonal ``J``); ``False``
            treats the batch as one vector.
        generator: Keyword only.  The random generator of the start, or ``None``.

    Returns:
        The :class:`SpectralEstimate`.

    Raises:
        ValueError: ``krylov_dim`` or ``tol`` is out of range.
    """
    if isinstance(krylov_dim, bool) or not isinstance(krylov_dim, int) or krylov_dim < 1:
        raise ValueError(f"jacobian_spectral_radius: krylov_dim must be an int >= 1, got {krylov_dim!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"jacobian_spectral_radius: tol must be a number >= 0, got {tol!r}")
    lin = linearize(f, z, x)
    n, d, matvec, _ = flat_operators(lin, per_sample)
    k = min(krylov_dim, d)
    eps = torch.finfo(z.dtype).eps
    Q = torch.zeros(n, k + 1, d, dtype=z.dtype, device=z.device)
    H = torch.zeros(n, k + 1, k, dtype=z.dtype, device=z.device)
    Q[:, 0] = random_rows(n, d, z, generator)
    invariant = torch.zeros(n, dtype=torch.bool, device=z.device)  # Krylov space exhausted
    rho = torch.full((n,), float("nan"), dtype=z.dtype, device=z.device)
    converged = False
    steps = 0
    for j in range(k):
        steps = j + 1
        w = matvec(Q[:, j])
        if not torch.isfinite(w).all():
            raise NonFiniteError("jacobian_spectral_radius: J v is NaN/Inf")
        scale = torch.linalg.vector_norm(w, dim=1)
        w, h = _orthogonalize(Q[:, : j + 1], w)
        H[:, : j + 1, j] = h
        beta = torch.linalg.vector_norm(w, dim=1)
        # Breakdown (J maps the Krylov space into itself): that sample's Ritz values are
        # exact; continue it with zeros in H so its leading block decides.
        broke = beta <= 1e3 * eps * scale.clamp_min(torch.finfo(z.dtype).tiny)
        was_invariant = invariant
        invariant = invariant | broke
        H[:, j + 1, j] = torch.where(invariant, torch.zeros_like(beta), beta)
        if j + 1 < k:
            fresh = random_rows(n, d, z, generator)
            fresh, _ = _orthogonalize(Q[:, : j + 1], fresh)
            fresh = fresh / torch.linalg.vector_norm(fresh, dim=1, keepdim=True)
            nxt = w / beta.clamp_min(torch.finfo(z.dtype).tiny).unsqueeze(1)
            Q[:, j + 1] = torch.where(invariant.unsqueeze(1), fresh, nxt)
        ritz = torch.linalg.eigvals(H[:, : j + 1, : j + 1])
        new = ritz.abs().max(dim=1).values
        # Once a sample's Krylov space is invariant its estimate is final (for a generic
        # start the invariant Krylov space holds every distinct eigenvalue of J).
        new = torch.where(was_invariant, rho, new)
        done = ((new - rho).abs() <= tol * new.clamp_min(torch.finfo(z.dtype).tiny)) | invariant
        rho = new
        if bool(invariant.all()) or (tol > 0 and j > 0 and bool(done.all())):
            converged = True
            break
    if steps == d:
        converged = True
    return SpectralEstimate(rho, float(rho.max()), steps, converged)
