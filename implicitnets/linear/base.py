"""The linear-solver protocol and the bookkeeping the built-in solvers share.

A linear solver solves ``A x = b`` for a :class:`~implicitnets.LinearOperator` ``A``
(``op.mv(x) = A x``, ``op.rmv(y) = Aᵀ y``) acting on tensors of ``b``'s shape; ``b`` and
``x`` are treated as one flat vector.  Work happens in ``b``'s dtype and on its device.
``info.residual`` is the *true* relative residual ``‖b − A x‖ / ‖b‖``, recomputed at the end.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..operator import LinearOperator
from ..options import check_int, check_real
from ..transforms import read

__all__ = ["LinearSolver", "LinearInfo"]

MatVec = Callable[[Tensor], Tensor]


class LinearSolver(abc.ABC):
    """Solves ``A x = b``; subclass it to plug your own solver into AID.

    ``solve`` returns ``(x, LinearInfo)``.  A solver that stops without converging, or
    meets NaN/Inf, reports it (``info.converged = False``, ``residual = inf`` when
    non-finite) and does not raise: the caller's failure policy decides.
    """

    @abc.abstractmethod
    def solve(self, op: LinearOperator, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, LinearInfo]:
        """Solve ``op x = b`` from ``x0`` (``None``: zero).

        Args:
            op: The :class:`~implicitnets.LinearOperator` ``A``.
            b: The right-hand side; ``A`` acts on tensors of its shape, treated as one flat
                vector.
            x0: The start, shaped like ``b``, or ``None`` for zero.

        Returns:
            ``(x, info)``: the solution shaped like ``b`` and its :class:`LinearInfo`.

        Raises:
            ValueError: ``x0`` or a product of ``op`` is not shaped like ``b``.
        """


@dataclass(frozen=True)
class LinearInfo:
    """What one linear solve did.

    ``iterations`` counts iterations (one ``op.mv`` each; :class:`NormalCG` also one
    ``op.rmv``; :class:`Exact` counts the ``op.mv`` calls that build ``A``).
    ``residual`` is ``‖b − A x‖ / ‖b‖`` (``inf`` if non-finite).  ``converged`` means
    ``residual <= tol`` when ``tol > 0`` and, when ``tol = 0``, that the residual is finite
    and did not grow beyond ``‖b‖``.

    Args:
        iterations: Iterations run (products with ``op`` for :class:`Exact`).
        residual: The true relative residual ``‖b − A x‖ / ‖b‖``, ``inf`` if non-finite.
        converged: Whether the solve converged in the sense above.
    """

    iterations: int
    residual: float
    converged: bool


def check_options(name: str, max_iter: int, tol: float) -> None:
    """Validate the options every built-in linear solver has."""
    check_int(name, "max_iter", max_iter)
    check_real(name, "tol", tol, low=0)


def dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


def norm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a)


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den == 0`` (no NaN from 0/0 at exact convergence)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def check_shape(out: Tensor, shape: torch.Size, name: str) -> None:
    """An operator's product must keep ``b``'s shape."""
    if out.shape != shape:
        raise ValueError(f"op.{name} returned shape {tuple(out.shape)}, expected b's shape {tuple(shape)}")


def flat_mv(op: LinearOperator, p: LinearSystem, transpose: bool = False) -> MatVec:
    """``A x`` (or ``Aᵀ x``) acting on flat vectors; checks on the first product that it
    preserves ``b``'s shape."""
    return _FlatProduct(op, p, transpose)


class _FlatProduct:
    def __init__(self, op: LinearOperator, p: LinearSystem, transpose: bool) -> None:
        self.product = op.rmv if transpose else op.mv
        self.shape, self.name, self.checked = p.shape, "rmv" if transpose else "mv", False

    def __call__(self, v: Tensor) -> Tensor:
        out = self.product(v.view(self.shape))
        if not self.checked:
            check_shape(out, self.shape, self.name)
            self.checked = True
        return out.reshape(-1)


class LinearSystem:
    """Flattened ``b``, the start ``x0`` (``None``: zero), and the bookkeeping shared by all solvers.

    The norm of ``b`` is read before the loop (one host synchronisation; a stopping
    threshold needs it) unless ``defer`` (for ``tol = 0``): then nothing is read until
    :meth:`finish`, which reads ``‖r‖``, ``‖b‖`` and the finiteness of ``x`` at once.
    """

    def __init__(self, name: str, b: Tensor, x0: Tensor | None, defer: bool = False):
        if x0 is not None and x0.shape != b.shape:
            raise ValueError(f"{name}: x0 has shape {tuple(x0.shape)}, b has shape {tuple(b.shape)}")
        self.shape = b.shape
        self.b = b.reshape(-1)
        self.x0 = None if x0 is None else x0.detach().to(b).reshape(-1).clone()
        self.warm = x0 is not None
        self.bnorm = None if defer else read(norm(self.b))  # the one host sync before the loop

    def trivial(self) -> tuple[Tensor, LinearInfo] | None:
        """The answer without iterating when ``b == 0`` (x = 0) or ``b`` is non-finite
        (known here unless ``defer``; :meth:`finish` handles both cases otherwise)."""
        if self.bnorm is None:
            return None
        if self.bnorm == 0.0:
            return torch.zeros_like(self.b).view(self.shape), LinearInfo(0, 0.0, True)
        if not math.isfinite(self.bnorm):
            return self.b.clone().view(self.shape), LinearInfo(0, math.inf, False)
        return None

    def finish(self, x: Tensor, r: Tensor, iterations: int, tol: float) -> tuple[Tensor, LinearInfo]:
        """Package ``x`` (any shape of ``b``'s size) with the true residual ``r = b − A x``.

        Inside ``torch.compile`` nothing is read on the host: ``residual`` is a 0-D tensor
        and ``converged`` a 0-D bool tensor (the tests below, without the NaN/Inf check)."""
        if torch.compiler.is_compiling():
            res = safe_div(norm(r), norm(self.b))
            return x.view(self.shape), LinearInfo(iterations, res, res <= (tol if tol > 0 else 1.0))
        rnorm, bnorm, total = read(torch.stack([norm(r), norm(self.b), x.sum()]))  # the one host sync
        x = x.view(self.shape)
        if bnorm == 0.0:  # b = 0: x = 0, whatever the iteration did
            return torch.zeros_like(x), LinearInfo(iterations, 0.0, True)
        res = rnorm / bnorm
        # a finite sum means a finite x; a sum that overflowed is confirmed element-wise
        if not math.isfinite(res) or not (math.isfinite(total) or bool(torch.isfinite(x).all())):
            return x, LinearInfo(iterations, math.inf, False)
        converged = res <= tol if tol > 0 else res <= 1.0
        return x, LinearInfo(iterations, res, converged)


def threshold(p: LinearSystem, tol: float) -> float:
    """``tol · ‖b‖``, the stopping threshold on ``‖r‖`` (0 for ``tol = 0``)."""
    return tol * p.bnorm if tol > 0 and p.bnorm is not None else 0.0


def stop(rnorm: Tensor, threshold: float, r: Tensor | None = None) -> bool:
    """Host-side stopping test (``tol > 0`` only): converged, or the iterate is non-finite.

    A norm that overflows while the residual ``r`` itself is finite does not stop the
    solve: a diverging iteration runs on until its iterate is non-finite, as with ``tol = 0``.
    """
    value = read(rnorm)
    if value <= threshold or math.isnan(value):
        return True
    if math.isinf(value):
        return r is None or not bool(torch.isfinite(r).all())
    return False


Inner = Callable[[MatVec, Tensor, Tensor, int, float], tuple[Tensor, int]]


def restarted(inner: Inner, mv: MatVec, p: LinearSystem, max_iter: int, tol: float) -> tuple[Tensor, LinearInfo]:
    """Run ``inner(mv, x, r, budget, threshold) -> (x, used)`` from the true residual.

    After each run the true residual is recomputed; if ``inner``'s own estimate claimed
    convergence but the true residual disagrees, ``inner`` restarts from it.  The last
    true residual is the one reported, so ``max_iter`` iterations cost ``max_iter + 1``
    matvecs (``+ 1`` more with a warm start).
    """
    x = torch.zeros_like(p.b) if p.x0 is None else p.x0
    used, limit = 0, threshold(p, tol)
    r = p.b - mv(x) if p.warm else p.b  # never modified in place
    while used < max_iter:
        if tol > 0 and stop(norm(r), limit, r):
            break
        x, k = inner(mv, x, r, max_iter - used, limit)
        used += k
        r = p.b - mv(x)
    return p.finish(x, r, used, tol)


