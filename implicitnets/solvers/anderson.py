"""Anderson acceleration (type II), batched per sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import check_int, check_real
from ..state import State
from .base import IterativeSolver, SolverStats
from .flat import solve_flat

__all__ = ["Anderson"]


@dataclass(frozen=True)
class Anderson(IterativeSolver):
    """Anderson acceleration (type II) of ``z = g(z)``, batched per sample.

    With the last ``m = memory`` iterates x_i, images f_i = g(x_i) and residuals
    r_i = f_i − x_i of each sample, solve ``min_α ‖Σ α_i r_i‖`` subject to ``Σ α_i = 1``:
    ``α ∝ (H + λ diag H)⁻¹ 1`` with the Gram matrix ``H_ij = ⟨r_i, r_j⟩`` and the ridge
    λ = ``regularization`` (at least 100 × the working dtype's machine epsilon, relative to
    each diagonal entry); a sample whose system is singular all the same (its residuals are
    exactly zero) takes a plain step.  Then ``x ← Σ α_i (x_i + mixing · r_i)``.  The first
    axis of every part of the state is the batch; a tuple state is flattened per sample into
    one row.  The history and the small systems are kept in at least float32 (outside
    autocast) whatever the map's dtype; the map sees its inputs in its own output dtype.
    Without autograd the history lives in preallocated ring buffers updated in place (one
    new Gram row per iteration); with autograd (ITD through Anderson) it is built out of
    place.  Returns ``g`` of the last extrapolated point.

    Stopping, ``on_failure``, ``freeze_converged`` and ``return_best`` follow
    :class:`FixedPointIteration` (a frozen sample's history is dropped).

    The options every built-in solver shares (``max_iter``, ``tol``, ``check_every``,
    ``on_failure``, ``freeze_converged``, ``return_best``) are those of
    :class:`~implicitnets.IterativeSolver`.

    Args:
        memory: Number ``m`` of past iterates kept per sample, an int >= 1.
        mixing: Mixing parameter ``β`` in ``(0, 1]``; ``1`` extrapolates the images ``f_i``.
        regularization: Ridge ``λ`` >= 0 on the Gram matrix, relative to its diagonal.

    Raises:
        ValueError: An option is out of range or of the wrong type.
    """

    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Anderson", "memory", self.memory)
        check_real("Anderson", "mixing", self.mixing, low=0, high=1, low_open=True)
        check_real("Anderson", "regularization", self.regularization, low=0)

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return ``g`` of the last extrapolated point and the stats.

        Args:
            g: The map ``z ↦ Φ(z, u)``, a callable state -> state (a
                :class:`~implicitnets.BoundMap` from the layer).
            z0: The start, a tensor or a tuple of tensors whose first axis is the batch.

        Returns:
            The value of ``g`` at the last extrapolated point and its :class:`SolverStats`.

        Raises:
            ValueError: The map's output is not shaped like its input.
            NonFiniteError: The map produced NaN or Inf (unless ``return_best``).
            ConvergenceError: The solve stopped above ``tol`` and ``on_failure`` is ``Raise()``.
        """
        return solve_flat(self, "Anderson", g, z0, lambda x, grad: _History(self, x, grad))


class _History:
    """The last ``m`` images and residuals of every active sample, their Gram matrices and
    the next extrapolated point ``x``; :meth:`push` adds an image and extrapolates."""

    def __init__(self, solver: Anderson, x: Tensor, grad: bool) -> None:
        self.m, self.beta, self.x, self.grad = solver.memory, float(solver.mixing), x, grad
        self.k = 0  # images pushed so far
        info = torch.finfo(x.dtype)
        self.ridge = 1.0 + max(float(solver.regularization), 100 * info.eps)
        # an exactly zero residual (a fixed point) gets this diagonal entry instead of zero,
        # hence (almost) all the weight, without a singular system
        self.floor = info.tiny / info.eps
        if grad:
            self.fs: list[Tensor] = []
            self.rs: list[Tensor] = []
            self.push = self._push_out_of_place
            return
        m, batch, d = self.m, x.shape[0], x.shape[1]
        eye = torch.eye(m, dtype=x.dtype, device=x.device)
        # the new Gram row ⟨r, r_i⟩ is scaled by `weight[slot]` and shifted by `shift[slot]`:
        # the ridge and the floor on its diagonal entry
        self.weight = [1.0 + (self.ridge - 1.0) * eye[i] for i in range(m)]
        self.shift = [self.floor * eye[i] for i in range(m)]
        # ring buffers, slot-major (slot, batch, d), not initialised: while fewer than m
        # images are in, only the first n slots are read; in the Gram matrix the unused
        # slots have a unit diagonal, decoupled from the used ones, with a zero right-hand side
        self.F = x.new_empty(m, batch, d)
        self.R = x.new_empty(m, batch, d)
        self.H = eye.repeat(batch, 1, 1)
        self.rhs = [torch.cat([x.new_ones(batch, n, 1), x.new_zeros(batch, m - n, 1)], 1) for n in range(1, m + 1)]
        self._views()
        self.push = self._push_in_place

    def _views(self) -> None:
        m, batch, d = self.m, self.F.shape[1], self.F.shape[2]
        self.F_slot, self.R_slot = list(self.F.unbind(0)), list(self.R.unbind(0))
        self.R_row = [r.unsqueeze(1) for r in self.R_slot]  # (batch, 1, d)
        self.H_row = [self.H[:, i : i + 1, :] for i in range(m)]
        self.H_col = [self.H[:, :, i : i + 1].transpose(1, 2) for i in range(m)]
        self.Rt = self.R.permute(1, 2, 0)  # (batch, d, slot)
        self.Fb, self.Rb = self.F.transpose(0, 1), self.R.transpose(0, 1)  # (batch, slot, d)
        # the extrapolated points, alternately in two buffers (the map may return its input)
        self.out = [self.F.new_empty(batch, 1, d) for _ in range(2)]

    def select(self, keep: Tensor) -> None:
        """Keep the samples ``keep`` (rows of the active set)."""
        self.x = self.x.index_select(0, keep)
        if self.grad:
            self.fs = [f.index_select(0, keep) for f in self.fs]
            self.rs = [r.index_select(0, keep) for r in self.rs]
            return
        self.F, self.R = self.F.index_select(1, keep), self.R.index_select(1, keep)
        self.H = self.H.index_select(0, keep)
        self.rhs = [b.index_select(0, keep) for b in self.rhs]
        self._views()

    def _push_in_place(self, fx: Tensor) -> None:
        """Add the image ``fx = g(x)`` and set ``x`` to the next extrapolated point."""
        x, k, beta = self.x, self.k, self.beta
        fw = fx if fx.dtype == x.dtype else fx.to(x.dtype)
        slot, n = k % self.m, min(k + 1, self.m)
        self.k = k + 1
        torch.sub(fw, x, out=self.R_slot[slot])
        self.F_slot[slot].copy_(fw)
        # the new Gram row over the slots in use (one batched product), ridge and floor on
        # its diagonal entry; the row's other entries keep their zeros
        row = self.H_row[slot][:, :, :n]
        product = torch.bmm(self.R_row[slot], self.Rt[:, :, :n])
        torch.addcmul(self.shift[slot][:n], product, self.weight[slot][:n], out=row)
        self.H_col[slot].copy_(self.H_row[slot])
        if n == 1:
            self.x = torch.lerp(x, fw, beta) if beta != 1.0 else fw
            return
        a = torch.linalg.solve_ex(self.H, self.rhs[n - 1])[0]
        # (batch, 1, n), Σ α_i = 1 (the unused slots' α are zero)
        alpha = (a / a.sum(1, keepdim=True)).transpose(1, 2)[:, :, :n]
        # x ← Σ α_i (x_i + β r_i) = Σ α_i f_i − (1 − β) Σ α_i r_i
        out = torch.bmm(alpha, self.Fb[:, :n], out=self.out[k % 2])
        if beta != 1.0:
            out.sub_(torch.bmm(alpha, self.Rb[:, :n]), alpha=1.0 - beta)
        self.x = out.squeeze(1)

    def _push_out_of_place(self, fx: Tensor) -> None:
        """:meth:`_push_in_place` for autograd: the same iterates, built out of place."""
        x, m, beta = self.x, self.m, self.beta
        fw = fx if fx.dtype == x.dtype else fx.to(x.dtype)
        self.fs, self.rs = (self.fs + [fw])[-m:], (self.rs + [fw - x])[-m:]
        n = len(self.fs)
        if n == 1:
            self.x = torch.lerp(x, fw, beta)
            return
        F, R = torch.stack(self.fs, 1), torch.stack(self.rs, 1)
        eye = torch.eye(n, dtype=R.dtype, device=R.device)
        H = torch.addcmul(self.floor * eye, R @ R.transpose(1, 2), 1 + (self.ridge - 1) * eye)
        a = torch.linalg.solve(H, H.new_ones(H.shape[0], n, 1))
        # a residual exactly zero: all the weight on it (what the floor gives in the
        # in-place path, without differentiating through 1 / floor)
        zero = (R.flatten(2) == 0).all(-1, keepdim=True)  # (batch, n, 1)
        a = torch.where(zero.any(1, keepdim=True), zero.to(a.dtype), a)
        alpha = (a / a.sum(1, keepdim=True)).transpose(1, 2)  # (batch, 1, n)
        x = torch.bmm(alpha, F).squeeze(1)
        if beta != 1.0:
            x = x - (1.0 - beta) * torch.bmm(alpha, R).squeeze(1)
        self.x = x
