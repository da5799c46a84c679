"""Linear solvers for the AID adjoint system ``A v = b`` with ``A = I − Jᵀ``.

Every solver has one call shape::

    x, info = solver.solve(matvec, b, x0=None, *, rmatvec=None)

``matvec(x) = A x`` (and ``rmatvec(y) = Aᵀ y`` for :class:`NormalCG`) act on tensors of
``b``'s shape; ``b`` and ``x`` are treated as one flat vector.  Work happens in ``b``'s
dtype and on its device.  ``info.residual`` is the *true* relative residual
``‖b − A x‖ / ‖b‖``, recomputed at the end.  ``tol = 0`` runs exactly ``max_iter``
iterations with no host synchronisation inside the loop; ``tol > 0`` synchronises once per
iteration for the stopping test.  A solver that stops without converging, or meets a
NaN/Inf, says so through ``info.converged = False`` (``residual = inf`` when non-finite); it
never raises for that — the caller's failure policy decides.

Which solver when (``J = ∂₁Φ`` at the fixed point):

* :class:`FixedPoint` — Richardson ``v ← Jᵀ v + b``; valid when the spectral radius of
  ``J`` is below 1 (contractive maps); error falls like ``‖J‖ᵏ``.
* :class:`CG` — conjugate gradients; valid only for symmetric positive definite ``A``
  (gradient-step maps with a symmetric Jacobian).  On a non-symmetric ``A`` it returns
  wrong answers, so it probes symmetry and warns (:class:`NonSymmetricWarning`).
* :class:`NormalCG` — CG on ``Aᵀ A x = Aᵀ b``; valid for any non-singular ``A``, squares
  the condition number, needs ``rmatvec``.
* :class:`GMRES` — restarted GMRES; valid for any non-singular ``A``.
* :class:`Exact` — dense ``torch.linalg.solve``; the reference for small problems.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "FixedPoint",
    "CG",
    "NormalCG",
    "GMRES",
    "Exact",
    "LinearInfo",
    "NonSymmetricWarning",
    "LinearSolver",
]

MatVec = Callable[[Tensor], Tensor]


class NonSymmetricWarning(UserWarning):
    """:class:`CG` was asked to solve a system whose operator is not symmetric."""


@dataclass(frozen=True)
class LinearInfo:
    """What one linear solve did.

    ``iterations`` counts iterations (one ``matvec`` each; :class:`NormalCG` also one
    ``rmatvec``; :class:`Exact` counts the ``matvec`` calls that build ``A``).
    ``residual`` is ``‖b − A x‖ / ‖b‖`` (``inf`` if non-finite).  ``converged`` means
    ``residual <= tol`` when ``tol > 0`` and, when ``tol = 0``, that the residual is finite
    and did not grow beyond ``‖b‖``.
    """

    iterations: int
    residual: float
    converged: bool


def _check_options(name: str, max_iter: int, tol: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{name}: max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{name}: tol must be a finite number >= 0, got {tol!r}")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


def _norm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den == 0`` (no NaN from 0/0 at exact convergence)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _flat(matvec: MatVec, shape: torch.Size) -> MatVec:
    """``matvec`` acting on flat vectors; checks that it preserves ``b``'s shape."""

    def mv(v: Tensor) -> Tensor:
        out = matvec(v.view(shape))
        if out.shape != shape:
            raise ValueError(f"matvec returned shape {tuple(out.shape)}, expected {tuple(shape)}")
        return out.reshape(-1)

    return mv


class _Problem:
    """Flattened ``b``, the start ``x``, and the bookkeeping shared by all solvers."""

    def __init__(self, name: str, b: Tensor, x0: Tensor | None):
        if x0 is not None and x0.shape != b.shape:
            raise ValueError(f"{name}: x0 has shape {tuple(x0.shape)}, b has shape {tuple(b.shape)}")
        self.shape = b.shape
        self.b = b.reshape(-1)
        self.x = torch.zeros_like(self.b) if x0 is None else x0.detach().to(b).reshape(-1).clone()
        self.warm = x0 is not None
        self.bnorm = float(_norm(self.b))  # the one host sync before the loop

    def trivial(self) -> tuple[Tensor, LinearInfo] | None:
        """The answer without iterating when ``b == 0`` (x = 0) or ``b`` is non-finite."""
        if self.bnorm == 0.0:
            return torch.zeros_like(self.b).view(self.shape), LinearInfo(0, 0.0, True)
        if not math.isfinite(self.bnorm):
            return self.b.clone().view(self.shape), LinearInfo(0, math.inf, False)
        return None

    def finish(self, x: Tensor, r: Tensor, iterations: int, tol: float) -> tuple[Tensor, LinearInfo]:
        """Package ``x`` with the true residual ``r = b − A x``."""
        res = float(_norm(r)) / self.bnorm
        if not math.isfinite(res) or not bool(torch.isfinite(x).all()):
            return x.view(self.shape), LinearInfo(iterations, math.inf, False)
        converged = res <= tol if tol > 0 else res <= 1.0
        return x.view(self.shape), LinearInfo(iterations, res, converged)


def _stop(rnorm: Tensor, threshold: float, r: Tensor | None = None) -> bool:
    """Host-side stopping test (``tol > 0`` only): converged, or the iterate is non-finite.

    A norm that overflows while the residual ``r`` itself is finite does not stop the
    solve: a diverging iteration runs on until its iterate is non-finite, as with ``tol = 0``.
    """
    value = float(rnorm)
    if value <= threshold or math.isnan(value):
        return True
    if math.isinf(value):
        return r is None or not bool(torch.isfinite(r).all())
    return False


Inner = Callable[[MatVec, Tensor, Tensor, int, float], tuple[Tensor, int]]


def _restarted(inner: Inner, mv: MatVec, p: _Problem, max_iter: int, tol: float) -> tuple[Tensor, LinearInfo]:
    """Run ``inner(mv, x, r, budget, threshold) -> (x, used)`` from the true residual.

    After each run the true residual is recomputed; if ``inner``'s own estimate claimed
    convergence but the true residual disagrees, ``inner`` restarts from it.  The last
    true residual is the one reported, so ``max_iter`` iterations cost ``max_iter + 1``
    matvecs (``+ 1`` more with a warm start).
    """
    x, used, threshold = p.x, 0, tol * p.bnorm
    r = p.b - mv(x) if p.warm else p.b.clone()
    while used < max_iter:
        if tol > 0 and _stop(_norm(r), threshold, r):
            break
        x, k = inner(mv, x, r, max_iter - used, threshold)
        used += k
        r = p.b - mv(x)
    return p.finish(x, r, used, tol)


@dataclass(frozen=True)
class FixedPoint:
    """Richardson iteration ``x ← x + (b − A x)``, i.e. ``v ← Jᵀ v + b`` for ``A = I − Jᵀ``.

    Valid when the spectral radius of ``I − A`` is below 1; the error contracts by about
    ``‖I − A‖`` per iteration.  From ``x0 = 0``, ``k`` iterations give the truncated
    Neumann series ``Σ_{j<k} (Jᵀ)ʲ b`` — the same as ITD truncated to ``k`` steps at ``w*``.
    ``max_iter`` iterations cost exactly ``max_iter`` matvecs (``+ 1`` with a warm start).
    """

    max_iter: int = 50
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_options("FixedPoint", self.max_iter, self.tol)

    def solve(
        self, matvec: MatVec, b: Tensor, x0: Tensor | None = None, *, rmatvec: MatVec | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` with ``matvec(x) = A x``; ``rmatvec`` is unused."""
        p = _Problem("FixedPoint", b, x0)
        if (done := p.trivial()) is not None:
            return done
        mv, x, threshold = _flat(matvec, p.shape), p.x, self.tol * p.bnorm
        r = p.b - mv(x) if p.warm else p.b.clone()  # always the true residual of x
        used = 0
        while used < self.max_iter:
            if self.tol > 0 and _stop(_norm(r), threshold, r):
                break
            x = x + r
            r = p.b - mv(x)
            used += 1
        return p.finish(x, r, used, self.tol)


def _cg_inner(mv: MatVec, x: Tensor, r: Tensor, budget: int, threshold: float) -> tuple[Tensor, int]:
    p, rr = r.clone(), _dot(r, r)
    for k in range(1, budget + 1):
        ap = mv(p)
        alpha = _safe_div(rr, _dot(p, ap))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r)
        if threshold > 0 and _stop(rr_new.sqrt(), threshold, r):
            return x, k
        p = r + _safe_div(rr_new, rr) * p
        rr = rr_new
    return x, budget


def _symmetry_mismatch(mv: MatVec, like: Tensor) -> float:
    """``|⟨w, A u⟩ − ⟨A w, u⟩| / (‖w‖‖A u‖ + ‖A w‖‖u‖)`` for two fixed random vectors."""
    gen = torch.Generator(device=like.device).manual_seed(0)  # leaves the global RNG alone
    u = torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    w = torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    au, aw = mv(u), mv(w)
    scale = float(_norm(w) * _norm(au) + _norm(aw) * _norm(u))
    gap = float((_dot(w, au) - _dot(aw, u)).abs())
    return gap / scale if scale > 0 else 0.0


@dataclass(frozen=True)
class CG:
    """Conjugate gradients for ``A x = b``; valid only for symmetric positive definite ``A``.

    With ``A = I − Jᵀ`` that means a symmetric ``J`` with eigenvalues below 1 (e.g.
    ``maps.GradientStep``).  On a non-symmetric ``A`` CG gives wrong answers that can get
    worse with more iterations; with ``check_symmetry`` two extra matvecs probe
    ``⟨w, A u⟩ = ⟨A w, u⟩`` and a relative mismatch above 1e-6 raises a
    :class:`NonSymmetricWarning` (use :class:`GMRES` or :class:`NormalCG` instead).
    """

    max_iter: int = 50
    tol: float = 1e-10
    check_symmetry: bool = True

    def __post_init__(self) -> None:
        _check_options("CG", self.max_iter, self.tol)
        if not isinstance(self.check_symmetry, bool):
            raise ValueError(f"CG: check_symmetry must be a bool, got {self.check_symmetry!r}")

    def solve(
        self, matvec: MatVec, b: Tensor, x0: Tensor | None = None, *, rmatvec: MatVec | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` (``A`` symmetric positive definite); ``rmatvec`` is unused."""
        p = _Problem("CG", b, x0)
        if (done := p.trivial()) is not None:
            return done
        mv = _flat(matvec, p.shape)
        if self.check_symmetry and p.b.numel() > 1:
            mismatch = _symmetry_mismatch(mv, p.b)
            if not mismatch <= 1e-6:
                warnings.warn(
                    f"CG: the operator is not symmetric (relative mismatch {mismatch:.2e}); "
                    "CG's answer is unreliable — use GMRES or NormalCG for non-symmetric systems",
                    NonSymmetricWarning,
                    stacklevel=2,
                )
        return _restarted(_cg_inner, mv, p, self.max_iter, self.tol)


@dataclass(frozen=True)
class NormalCG:
    """CG on the normal equations ``Aᵀ A x = Aᵀ b`` (CGNR); valid for any non-singular ``A``.

    Needs ``rmatvec(y) = Aᵀ y`` (for ``A = I − Jᵀ``: ``y − J y``).  Each iteration costs one
    ``matvec`` and one ``rmatvec``; convergence follows ``cond(A)²``.  Stops on the residual
    of the original system ``‖b − A x‖``.
    """

    max_iter: int = 50
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _check_options("NormalCG", self.max_iter, self.tol)

    def solve(
        self, matvec: MatVec, b: Tensor, x0: Tensor | None = None, *, rmatvec: MatVec | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` through ``Aᵀ A x = Aᵀ b``; ``rmatvec`` is required."""
        if rmatvec is None:
            raise ValueError("NormalCG: rmatvec (y -> A^T y) is required to solve A^T A x = A^T b")
        p = _Problem("NormalCG", b, x0)
        if (done := p.trivial()) is not None:
            return done
        rmv = _flat(rmatvec, p.shape)

        def inner(mv: MatVec, x: Tensor, r: Tensor, budget: int, threshold: float) -> tuple[Tensor, int]:
            z = rmv(r)
            d, zz = z.clone(), _dot(z, z)
            for k in range(1, budget + 1):
                ad = mv(d)
                alpha = _safe_div(zz, _dot(ad, ad))
                x = x + alpha * d
                r = r - alpha * ad
                if k == budget or (threshold > 0 and _stop(_norm(r), threshold, r)):
                    return x, k
                z = rmv(r)
                zz_new = _dot(z, z)
                d = z + _safe_div(zz_new, zz) * d
                zz = zz_new
            return x, budget

        return _restarted(inner, _flat(matvec, p.shape), p, self.max_iter, self.tol)


def _gmres_cycle(
    mv: MatVec, x: Tensor, r: Tensor, m: int, threshold: float
) -> tuple[Tensor, int]:
    """One GMRES cycle of at most ``m`` Arnoldi steps (modified Gram–Schmidt, Givens)."""
    n, eps = r.numel(), torch.finfo(r.dtype).eps
    V = r.new_zeros(m + 1, n)
    R = r.new_zeros(m + 1, m)  # Hessenberg, rotated into upper triangular in place
    cs, sn = r.new_zeros(m), r.new_zeros(m)
    beta = _norm(r)
    V[0] = _safe_div(r, beta)
    g = r.new_zeros(m + 1)
    g[0] = beta
    k = m
    for j in range(m):
        w = mv(V[j])
        w_norm0 = _norm(w)
        for i in range(j + 1):
            R[i, j] = _dot(w, V[i])
            w = w - R[i, j] * V[i]
        h = _norm(w)
        # Happy breakdown: w is (numerically) in the Krylov space already.
        h = torch.where(h <= (j + 1) * eps * w_norm0, torch.zeros_like(h), h)
        V[j + 1] = _safe_div(w, h)
        R[j + 1, j] = h
        for i in range(j):
            top = cs[i] * R[i, j] + sn[i] * R[i + 1, j]
            R[i + 1, j] = -sn[i] * R[i, j] + cs[i] * R[i + 1, j]
            R[i, j] = top
        denom = torch.hypot(R[j, j], R[j + 1, j])
        cs[j] = torch.where(denom != 0, _safe_div(R[j, j], denom), torch.ones_like(denom))
        sn[j] = _safe_div(R[j + 1, j], denom)
        R[j, j], R[j + 1, j] = denom, 0.0
        g[j + 1] = -sn[j] * g[j]
        g[j] = cs[j] * g[j]
        if threshold > 0 and _stop(g[j + 1].abs(), threshold):
            k = j + 1
            break
    T = R[:k, :k]
    diag = T.diagonal()
    T = T + torch.diag((diag == 0).to(T.dtype))  # zero pivots only after breakdown: y_i = 0
    y = torch.linalg.solve_triangular(T, g[:k, None], upper=True)[:, 0]
    return x + V[:k].T @ y, k


@dataclass(frozen=True)
class GMRES:
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
        _check_options("GMRES", self.max_iter, self.tol)
        if isinstance(self.restart, bool) or not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES: restart must be an int >= 1, got {self.restart!r}")

    def solve(
        self, matvec: MatVec, b: Tensor, x0: Tensor | None = None, *, rmatvec: MatVec | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` with ``matvec(x) = A x``; ``rmatvec`` is unused."""
        p = _Problem("GMRES", b, x0)
        if (done := p.trivial()) is not None:
            return done

        def inner(mv: MatVec, x: Tensor, r: Tensor, budget: int, threshold: float) -> tuple[Tensor, int]:
            return _gmres_cycle(mv, x, r, min(self.restart, budget), threshold)

        return _restarted(inner, _flat(matvec, p.shape), p, self.max_iter, self.tol)


@dataclass(frozen=True)
class Exact:
    """Dense solve: builds ``A`` column by column (``numel(b)`` matvecs), ``torch.linalg.solve``.

    The reference for small problems (``numel(b)`` up to a few thousand); ``x0`` is ignored.
    ``converged`` is ``False`` if ``A`` is singular (the pseudo-inverse solution is returned),
    the result is non-finite, or the residual exceeds ``sqrt(eps)`` of ``b``'s dtype.
    """

    def solve(
        self, matvec: MatVec, b: Tensor, x0: Tensor | None = None, *, rmatvec: MatVec | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` exactly; ``x0`` and ``rmatvec`` are unused."""
        p = _Problem("Exact", b, None)
        if (done := p.trivial()) is not None:
            return done
        mv, n = _flat(matvec, p.shape), p.b.numel()
        eye = torch.eye(n, dtype=p.b.dtype, device=p.b.device)
        A = torch.stack([mv(eye[i]) for i in range(n)], dim=1)
        try:
            x, singular = torch.linalg.solve(A, p.b), False
        except torch.linalg.LinAlgError:
            x, singular = torch.linalg.pinv(A) @ p.b, True
        x, info = p.finish(x, p.b - A @ x, n, 0.0)
        ok = info.converged and not singular and info.residual <= math.sqrt(torch.finfo(p.b.dtype).eps)
        return x, LinearInfo(info.iterations, info.residual, ok)


LinearSolver = FixedPoint | CG | NormalCG | GMRES | Exact
