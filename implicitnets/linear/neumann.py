"""Richardson iteration on ``(I − Jᵀ) v = b``: the truncated Neumann series of AID-FP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..compiled import Compile, use_compiled
from ..operator import LinearOperator
from ..options import check_bool, check_instance
from ..transforms import read
from .base import LinearInfo, LinearSolver, LinearSystem, check_options, check_shape, norm, stop, threshold

__all__ = ['Neumann']


@dataclass(frozen=True)
class Neumann(LinearSolver):
    """Richardson iteration ``x ← x + (b − A x)``, i.e. ``v ← Jᵀ v + b`` for ``A = I − Jᵀ``.

    Valid when the spectral radius of ``I − A`` is below 1; the error contracts by about
    ``‖I − A‖`` per iteration.  From ``x0 = 0``, ``k`` iterations give the truncated
    Neumann series ``Σ_{j<k} (Jᵀ)ʲ b`` — the same as ITD truncated to ``k`` steps at ``w*``.
    Each iteration is one product ``(I − A) x + b`` (``op.identity_minus().mv_add``: for
    the adjoint operator one fused ``Jᵀ x + b``); the product that gives the last iterate's
    true residual also gives the next iterate, which is discarded.  ``max_iter`` iterations
    cost exactly ``max_iter`` products (``+ 1`` with a warm start).

    ``per_sample=True`` (with ``tol > 0``) stops when every sample — every row of ``b``'s
    first axis, as the forward solve counts them — has a relative residual
    ``‖b_i − (A x)_i‖ / ‖b_i‖`` of at most ``tol``, instead of the whole batch's: a batch
    with one large right-hand side no longer stops while the small ones are still far off.

    Args:
        max_iter: Maximum number of iterations, an int >= 1.
        tol: Tolerance on the relative residual ``‖b − A x‖ / ‖b‖``, >= 0; ``0`` runs exactly
            ``max_iter`` iterations.
        per_sample: Stop when every row of ``b``'s first axis reaches ``tol`` (with ``tol > 0``),
            not the whole vector.
        compile: A :class:`~implicitnets.Compile` to run the iterations through
            ``torch.compile`` (all of them as one function when ``tol = 0``, else each step),
            or ``None`` (eager).

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    max_iter: int = 50
    tol: float = 1e-10
    per_sample: bool = False
    compile: Compile | None = None

    def __post_init__(self) -> None:
        check_options("Neumann", self.max_iter, self.tol)
        check_bool("Neumann", "per_sample", self.per_sample)
        if self.compile is not None:
            check_instance("Neumann", "compile", self.compile, Compile, "Compile()")

    def solve(
        self, op: LinearOperator, b: Tensor, x0: Tensor | None = None
    ) -> tuple[Tensor, LinearInfo]:
        """Solve ``A x = b`` with ``(I − A) x + b = op.identity_minus().mv_add(x, b)``.

        See :meth:`LinearSolver.solve` for the arguments and the result.
        """
        p = LinearSystem("Neumann", b, x0, defer=self.tol == 0)
        if (done := p.trivial()) is not None:
            return done
        M, shape, limit = op.identity_minus(), p.shape, threshold(p, self.tol)
        b = p.b.view(shape)
        rows = b.reshape(b.shape[0], -1) if self.per_sample and b.dim() > 1 else None
        if rows is not None:  # per sample: the worst ‖r_i‖ / ‖b_i‖ against tol
            scale = 1.0 / torch.linalg.vector_norm(rows, dim=1).clamp_min(torch.finfo(b.dtype).tiny)
            limit = self.tol

        compiled = use_compiled(self.compile, b)
        # one iteration: the next iterate (I − A) x + b; next − x is x's residual b − A x
        product = (lambda x, c: self.compile(richardson_step)(M, x, c)) if compiled else M.mv_add

        def first_step(x: Tensor) -> Tensor:
            try:
                out = product(x, b)
            except RuntimeError:
                check_shape(op.mv(x), shape, "mv")  # name a product of the wrong shape
                raise
            check_shape(out, shape, "mv")
            return out

        # x and its successor y; from x0 = 0 the successor is b itself (no product)
        x, y = (p.x0.view(shape), first_step(p.x0.view(shape))) if p.x0 is not None else (None, b)
        if compiled and self.tol == 0:  # the whole loop as one compiled function
            x, r = self.compile(richardson)(M, y, b, self.max_iter)
            return p.finish(b.clone() if x is b else x, r, self.max_iter, self.tol)
        used = 0
        while used < self.max_iter:
            if self.tol > 0:
                r = y if x is None else y - x
                if rows is None:
                    rnorm = norm(r)
                else:  # a residual that is NaN somewhere makes the maximum NaN: stop, as below
                    rnorm = (torch.linalg.vector_norm(r.reshape(rows.shape), dim=1) * scale).max()
                if stop(rnorm, limit, r):
                    if not read(rnorm) <= limit:  # diverged: hand back the non-finite iterate
                        x = y
                    break
            x = y
            y = product(x, b) if used else first_step(x)
            used += 1
        if x is None:  # stopped before the first iteration (cold start): x = 0, r = b
            return p.finish(torch.zeros_like(b), b, 0, self.tol)
        if x is b:  # never hand back the caller's b itself
            x = b.clone()
        return p.finish(x, y - x, used, self.tol)


def richardson_step(M: LinearOperator, x: Tensor, b: Tensor) -> Tensor:
    """One Richardson step ``M x + b`` (``M = I − A``)."""
    return M.mv_add(x, b)


def richardson(M: LinearOperator, y: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``k`` Richardson iterations from the iterate whose successor is ``y``: the last
    iterate ``x`` and its residual ``b − A x = (M x + b) − x`` (``M = I − A``)."""
    for _ in range(k - 1):
        y = M.mv_add(y, b)
    x = y
    return x, M.mv_add(x, b) - x
