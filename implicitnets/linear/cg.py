"""Conjugate gradients: :class:`CG` (symmetric positive definite ``A``) and :class:`NormalCG`
(CG on ``Aᵀ A x = Aᵀ b``, any non-singular ``A``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..operator import LinearOperator
from ..options import check_bool
from ..transforms import read
from .base import (
    LinearInfo,
    LinearSolver,
    LinearSystem,
    MatVec,
    check_options,
    dot,
    flat_mv,
    norm,
    restarted,
    safe_div,
    stop,
)


class NonSymmetricWarning(UserWarning):
    """:class:`CG` was asked to solve a system whose operator is not symmetric."""

__all__ = ['CG', 'NormalCG', 'NonSymmetricWarning']


def _cg_inner(mv: MatVec, x: Tensor, r: Tensor, budget: int, threshold: float) -> tuple[Tensor, int]:
    p, rr = r.clone(), dot(r, r)
    for k in range(1, budget + 1):
        ap = mv(p)
        alpha = safe_div(rr, dot(p, ap))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = dot(r, r)
        if threshold > 0 and stop(rr_new.sqrt(), threshold, r):
            return x, k
        p = r + safe_div(rr_new, rr) * p
        rr = rr_new
    return x, budget


def _symmetry_mismatch(mv: MatVec, like: Tensor) -> float:
    """``|⟨w, A u⟩ − ⟨A w, u⟩| / (‖w‖‖A u‖ + ‖A w‖‖u‖)`` for two fixed random vectors."""
    gen = torch.Generator(device=like.device).manual_seed(0)  # leaves the global RNG alone
    u = torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    w = torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    au, aw = mv(u), mv(w)
    scale, gap = read(torch.stack([norm(w) * norm(au) + norm(aw) * norm(u), (dot(w, au) - dot(aw, u)).abs()]))
    return gap / scale if scale > 0 else 0.0


@dataclass(frozen=True)
class CG(LinearSolver):
    """Conjugate gradients for ``A x = b``; valid only for symmetric positive definite ``A``.

    With ``A = I − Jᵀ`` that means a symmetric ``J`` with eigenvalues below 1 (e.g.
    ``maps.GradientStep``).  On a non-symmetric ``A`` CG gives wrong answers that can get
    worse with more iterations; with ``check_symmetry`` two extra matvecs probe
    ``⟨w, A u⟩ = ⟨A w, u⟩`` and a relative mismatch above 1e-6 raises a
    :class:`NonSymmetricWarning` (use :class:`GMRES` or :class:`NormalCG` instead).

    Args:
        max_iter: Maximum number of iterations, an int >= 1.
        tol: Tolerance on the relative residual ``‖b − A x‖ / ‖b‖``, >= 0; ``0`` runs exactly
            ``max_iter`` iterations.
        check_symmetry: Probe the symmetry of ``A`` with two extra matvecs per solve (when
            ``b`` has more than one element).

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    max_iter: int = 50
    tol: float = 1e-10
    check_symmetry: bool = True

    def __post_init__(self) -> None:
        check_options("CG", self.max_iter, self.tol)
        check_bool("CG", "check_symmetry", self.check_symmetry)

    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` (``A`` symmetric positive definite).

        See :meth:`LinearSolver.solve` for the arguments and the result.
        """
        p = LinearSystem("CG", b, x0, defer=self.tol == 0)
        if (done := p.trivial()) is not None:
            return done
        mv = flat_mv(op, p)
        if self.check_symmetry and p.b.numel() > 1:
            mismatch = _symmetry_mismatch(mv, p.b)
            if not mismatch <= 1e-6:
                warnings.warn(
                    f"CG: the operator is not symmetric (relative mismatch {mismatch:.2e}); "
                    "CG's answer is unreliable — use GMRES or NormalCG for non-symmetric systems",
                    NonSymmetricWarning,
                    stacklevel=2,
                )
        return restarted(_cg_inner, mv, p, self.max_iter, self.tol)


@dataclass(frozen=True)
class NormalCG(LinearSolver):
    """CG on the normal equations ``Aᵀ A x = Aᵀ b`` (CGNR); valid for any non-singular ``A``.

    Uses ``op.rmv(y) = Aᵀ y`` (for ``A = I − Jᵀ``: ``y − J y``).  Each iteration costs one
    ``mv`` and one ``rmv``; convergence follows ``cond(A)²``.  Stops on the residual
    of the original system ``‖b − A x‖``.

    Args:
        max_iter: Maximum number of iterations, an int >= 1.
        tol: Tolerance on the relative residual ``‖b − A x‖ / ‖b‖``, >= 0; ``0`` runs exactly
            ``max_iter`` iterations.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    max_iter: int = 50
    tol: float = 1e-10

    def __post_init__(self) -> None:
        check_options("NormalCG", self.max_iter, self.tol)

    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` through ``Aᵀ A x = Aᵀ b`` (uses ``op.rmv``).

        See :meth:`LinearSolver.solve` for the arguments and the result.
        """
        p = LinearSystem("NormalCG", b, x0, defer=self.tol == 0)
        if (done := p.trivial()) is not None:
            return done
        rmv = flat_mv(op, p, transpose=True)

        def inner(mv: MatVec, x: Tensor, r: Tensor, budget: int, threshold: float) -> tuple[Tensor, int]:
            z = rmv(r)
            d, zz = z.clone(), dot(z, z)
            for k in range(1, budget + 1):
                ad = mv(d)
                alpha = safe_div(zz, dot(ad, ad))
                x = x + alpha * d
                r = r - alpha * ad
                if k == budget or (threshold > 0 and stop(norm(r), threshold, r)):
                    return x, k
                z = rmv(r)
                zz_new = dot(z, z)
                d = z + safe_div(zz_new, zz) * d
                zz = zz_new
            return x, budget

        return restarted(inner, flat_mv(op, p), p, self.max_iter, self.tol)
