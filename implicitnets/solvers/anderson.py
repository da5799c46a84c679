"""Anderson acceleration (type II), batched per sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..failure import FailurePolicy, Warn
from ..state import Flattener, State
from .base import ForwardSolver, SolverStats
from .monitor import Monitor, check_common, check_structure

__all__ = ["Anderson"]


@dataclass(frozen=True)
class Anderson(ForwardSolver):
    """Anderson acceleration (type II) of ``z = g(z)``, batched per sample.

    With the last ``m = memory`` iterates x_i and residuals r_i = g(x_i) − x_i of each sample,
    solve ``min_α ‖Σ α_i r_i‖`` subject to ``Σ α_i = 1`` (ridge ``regularization``, at least
    100 × the working dtype's machine epsilon, relative to the Gram matrix's mean diagonal;
    a sample whose system is singular all the same takes a plain step), then
    ``x ← Σ α_i (x_i + mixing · r_i)``.  The first axis of every part of the state is the
    batch; a tuple state is flattened per sample into one row.  The history and the small
    systems are kept in at least float32 (outside autocast) whatever the map's dtype; the
    map sees its inputs in its own output dtype.  Without autograd the history lives in
    preallocated buffers updated in place; with autograd (ITD through Anderson) it is built
    out of place.  Stopping and ``on_failure`` follow :class:`FixedPointIteration`.
    """

    max_iter: int = 50
    tol: float = 1e-5
    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-10
    check_every: int | None = None
    on_failure: FailurePolicy = Warn()

    def __post_init__(self) -> None:
        check_common("Anderson", self.max_iter, self.tol, self.check_every, self.on_failure)
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"Anderson: memory must be an int >= 1, got {self.memory!r}")
        if isinstance(self.mixing, bool) or not isinstance(self.mixing, (int, float)) or not 0 < self.mixing <= 1:
            raise ValueError(f"Anderson: mixing must be in (0, 1], got {self.mixing!r}")
        if isinstance(self.regularization, bool) or not isinstance(self.regularization, (int, float)) or not (
            self.regularization >= 0
        ):
            raise ValueError(f"Anderson: regularization must be >= 0, got {self.regularization!r}")

    def solve(self, g: Callable[[State], State], z0: State) -> tuple[State, SolverStats]:
        """Iterate from ``z0``; return ``g`` of the last extrapolated point and the stats."""
        monitor = Monitor("Anderson", self.max_iter, self.tol, self.check_every, z0)
        flat = Flattener(z0)
        batch, m, beta = flat.batch, self.memory, float(self.mixing)
        in_place = not torch.is_grad_enabled()
        fz = g(z0)
        check_structure(fz, z0)
        x0 = flat.flatten(z0)
        out_dtype = flat.flatten(fz).dtype
        work = torch.promote_types(out_dtype, torch.float32)
        device = x0.device
        x = x0.to(work)
        ridge = max(float(self.regularization), 100 * torch.finfo(work).eps)
        eye = torch.eye(m, dtype=work, device=device)
        ones = torch.ones(batch, m, 1, dtype=work, device=device)
        tiny = torch.finfo(work).tiny
        if in_place:
            # History of images f_i = g(x_i) and residuals r_i = f_i − x_i and their Gram
            # matrix H = R Rᵀ, one new row per iteration.
            F = x.new_zeros(batch, m, x.shape[1])
            R = x.new_zeros(batch, m, x.shape[1])
            H = x.new_zeros(batch, m, m)
        else:
            fs: list[Tensor] = []
            rs: list[Tensor] = []
        for k in range(self.max_iter):
            if k > 0:
                fz = g(flat.unflatten(x.to(out_dtype)))
                check_structure(fz, z0)
            fx = flat.flatten(fz)
            stop = monitor.record(fx, x)
            if stop or k == self.max_iter - 1:
                break
            n, slot = min(k + 1, m), k % m
            with torch.autocast(device.type, enabled=False):
                fw = fx.to(work)
                if in_place:
                    r = torch.sub(fw, x, out=R[:, slot])
                    F[:, slot].copy_(fw)
                    Fh, Rh = F[:, :n], R[:, :n]
                    column = torch.bmm(Rh, r.unsqueeze(-1)).squeeze(-1)  # ⟨r_i, r_new⟩, i < n
                    H[:, slot, :n] = column
                    H[:, :n, slot] = column
                    Hh = H[:, :n, :n]
                else:
                    fs, rs = (fs + [fw])[-m:], (rs + [fw - x])[-m:]
                    Fh, Rh = torch.stack(fs, 1), torch.stack(rs, 1)
                    Hh = Rh @ Rh.transpose(1, 2)
                if n == 1:
                    x = torch.lerp(x, fw, beta)
                    continue
                # min ‖Σ α_i r_i‖² s.t. Σ α_i = 1: α ∝ (H + λI)⁻¹ 1, with H scaled to unit mean
                # diagonal (a converged sample, all residuals zero, gets uniform α instead of
                # a singular system)
                scale = Hh.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(tiny)[:, None, None]
                a, info = torch.linalg.solve_ex(Hh / scale + eye[:n, :n] * ridge, ones[:, :n])
                # a sample whose system is still singular puts all weight on the newest point,
                # i.e. takes the plain damped step x + β r
                newest = slot if in_place else n - 1
                a = torch.where((info != 0)[:, None, None], eye[:n, newest : newest + 1], a)
                alpha = (a / a.sum(1, keepdim=True)).transpose(1, 2)  # (batch, 1, n)
                # x ← Σ α_i (x_i + β r_i) = Σ α_i f_i − (1 − β) Σ α_i r_i
                x = (alpha @ Fh).squeeze(1)
                if beta != 1.0:
                    x = x - (1.0 - beta) * (alpha @ Rh).squeeze(1)
        return fz, monitor.finish(self.on_failure)
