"""Limited-memory ("good") Broyden's method, batched per sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import check_int
from ..state import State
from .base import IterativeSolver, SolverStats
from .flat import solve_flat

__all__ = ["Broyden"]


@dataclass(frozen=True)
class Broyden(IterativeSolver):
    """Broyden's ("good") quasi-Newton method on the residual ``F(z) = g(z) − z``.

    Each sample keeps a low-rank approximation ``B = −I + Σ_i u_i v_iᵀ`` of the inverse
    Jacobian of ``F`` (``B = −I`` gives the plain step ``z ← g(z)``) and steps
    ``z ← z − B F(z)``.  After each step ``Δz`` with residual change ``ΔF`` it takes the
    rank-one update of the good Broyden method in inverse form,

        ``B ← B + (Δz − B ΔF) (Δzᵀ B) / (Δzᵀ B ΔF)``,

    After ``m = memory`` updates it restarts from ``B = −I`` (dropping only the oldest
    update instead makes the iteration diverge on hard linear problems).  A sample whose
    update is singular (the
    denominator ``Δzᵀ B ΔF`` is zero or tiny relative to ``‖Δzᵀ B‖ ‖ΔF‖``) skips it and
    takes a plain step.  The first axis of every part of the state is the batch; a tuple
    state is flattened per sample into one row.  The updates are kept in at least float32
    (outside autocast) whatever the map's dtype; the map sees its inputs in its own output
    dtype.  Without autograd the updates live in preallocated buffers written in place;
    with autograd (ITD through Broyden) they are built out of place.  Returns ``g`` of the
    last point.

    Stopping, ``check_every``, ``on_failure``, ``freeze_converged`` and ``return_best``
    follow :class:`FixedPointIteration`.  On a linear map Broyden's method without restarts
    converges in at most 2d steps (Gay 1979); on a contraction it typically needs far fewer
    evaluations than fixed-point iteration, but it is not globally convergent: use
    ``return_best`` when some samples may be far from their fixed point.

    The options every built-in solver shares (``max_iter``, ``tol``, ``check_every``,
    ``on_failure``, ``freeze_converged``, ``return_best``) are those of
    :class:`~implicitnets.IterativeSolver`.

    Args:
        memory: Number ``m`` of rank-one updates kept per sample before a restart from
            ``B = −I``, an int >= 1.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    memory: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Broyden", "memory", self.memory)

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return ``g`` of the last point and the stats.

        Args:
            g: The map ``z ↦ Φ(z, u)``, a callable state -> state (a
                :class:`~implicitnets.BoundMap` from the layer).
            z0: The start, a tensor or a tuple of tensors whose first axis is the batch.

        Returns:
            The value of ``g`` at the last point and its :class:`SolverStats`.

        Raises:
            ValueError: The map's output is not shaped like its input.
            NonFiniteError: The map produced NaN or Inf (unless ``return_best``).
            ConvergenceError: The solve stopped above ``tol`` and ``on_failure`` is ``Raise()``.
        """
        return solve_flat(self, "Broyden", g, z0, lambda x, grad: _Updates(self.memory, x, grad))


class _Updates:
    """The last ``m`` rank-one updates ``(u_i, v_i)`` of every active sample, its point
    ``x``, the residual ``F`` and ``B F`` at the previous point and the step ``p`` from it."""

    def __init__(self, m: int, x: Tensor, grad: bool) -> None:
        self.m, self.x, self.grad = m, x, grad
        self.k = 0  # updates taken so far
        self.F: Tensor | None = None  # the residual at x (None before the first step)
        self.BF: Tensor | None = None  # B F, with the B that chose the step p
        self.p: Tensor | None = None  # the step that led to x
        self.eps = torch.finfo(x.dtype).eps
        if grad:
            self.us: list[Tensor] = []
            self.vs: list[Tensor] = []
        else:  # buffers, slot-major (slot, batch, d); the first k slots hold the updates
            self.U = x.new_zeros(m, x.shape[0], x.shape[1])
            self.V = x.new_zeros(m, x.shape[0], x.shape[1])

    def select(self, keep: Tensor) -> None:
        """Keep the samples ``keep`` (rows of the active set)."""
        pick = lambda t: t.index_select(0, keep)
        self.x = pick(self.x)
        if self.F is not None:
            self.F, self.BF, self.p = pick(self.F), pick(self.BF), pick(self.p)
        if self.grad:
            self.us, self.vs = [pick(u) for u in self.us], [pick(v) for v in self.vs]
        else:
            self.U, self.V = self.U.index_select(1, keep), self.V.index_select(1, keep)

    def _times_B(self, y: Tensor, left: bool = False) -> Tensor:
        """``B y`` (or ``yᵀ B`` with ``left``) for every sample, ``y`` of shape (batch, d)."""
        if not self.k:
            return -y
        if self.grad:
            U, V = torch.stack(self.us), torch.stack(self.vs)
        else:
            U, V = self.U[: self.k], self.V[: self.k]
        if left:
            U, V = V, U
        # slot-major (k, batch, d) operands, viewed per sample: the fast layouts for bmm
        coef = torch.bmm(y.unsqueeze(1), V.permute(1, 2, 0))  # (batch, 1, k): v_iᵀ y
        return torch.bmm(coef, U.transpose(0, 1)).squeeze(1) - y

    def push(self, fx: Tensor) -> None:
        """Take the residual at ``x`` (``fx = g(x)``), update ``B`` and step."""
        F = fx.to(self.x.dtype) - self.x
        if self.F is None:  # B = −I: the plain step
            self.F, self.BF, self.p = F, -F, F
            self.x = self.x + F
            return
        dF = F - self.F
        if self.k == self.m:  # memory full: restart from B = −I
            self.k, self.us, self.vs, self.BF = 0, [], [], -self.F
        BF = self._times_B(F)
        v = self._times_B(self.p, left=True)  # (Δzᵀ B)ᵀ
        den = (v * dF).sum(-1, keepdim=True)  # Δzᵀ B ΔF
        scale = torch.linalg.vector_norm(v, dim=-1, keepdim=True) * torch.linalg.vector_norm(dF, dim=-1, keepdim=True)
        ok = den.abs() > 100 * self.eps * scale  # False for NaN
        safe = torch.where(ok, den, torch.ones_like(den))
        # u = (Δz − B ΔF) / den, with B ΔF = B F − B F_old
        u = torch.where(ok, (self.p - BF + self.BF) / safe, torch.zeros_like(BF))
        v = torch.where(ok, v, torch.zeros_like(v))
        BF = BF + u * (v * F).sum(-1, keepdim=True)  # (B + u vᵀ) F
        if self.grad:
            self.us, self.vs = self.us + [u], self.vs + [v]
        else:
            self.U[self.k].copy_(u)
            self.V[self.k].copy_(v)
        self.k += 1
        # the quasi-Newton step −B F; a sample whose update was singular steps plainly
        self.p = torch.where(ok, -BF, F)
        self.F, self.BF = F, BF
        self.x = self.x + self.p
