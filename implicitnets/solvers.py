"""Forward solvers for the fixed-point equation ``z = g(z)`` and their statistics.

Both solvers stop on the *relative residual* of the whole batch,

    r(z) = ‖g(z) − z‖ / max(‖g(z)‖, tiny),

evaluated every ``check_every`` map evaluations and after the last one (``SolverStats.trace``
holds these values).  ``check_every=None`` (the default) means every evaluation when
``tol > 0`` and only after the last one when ``tol = 0`` (nothing to stop on; pass
``check_every=1`` for a full trace).  ``tol = 0`` runs exactly ``max_iter`` map
evaluations (the number ``t`` of the paper) and never stops early.  Residuals are kept on the device during the loop; the
host synchronises only at the stopping checks (none when ``tol = 0``) and once at the end to
fill :class:`SolverStats`.  Between checks an iteration does no work beyond the map
evaluation and the solver's update: ``check_every = 1`` gives the earliest stop and a full
trace; a larger value trades a few extra evaluations for fewer reductions and host syncs
(worth it for cheap maps and on GPUs).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError

__all__ = ["SolverStats", "FixedPointIteration", "Anderson", "ForwardSolver"]


@dataclass
class SolverStats:
    """What one solve did; the backward pass fills the ``backward_*`` fields.

    ``iterations`` counts map evaluations, ``residual`` is the relative residual of the
    last evaluation, ``trace`` the residuals at every check (every ``check_every``
    evaluations and the last one).  ``backward_fallback`` names the method a
    failure policy fell back to, if any.
    """

    iterations: int = 0
    residual: float = math.nan
    converged: bool = False
    trace: list[float] = field(default_factory=list)
    backward_iterations: int | None = None
    backward_residual: float | None = None
    backward_converged: bool | None = None
    backward_fallback: str | None = None


def _check_common(name: str, max_iter: int, tol: float, check_every: int | None) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{name}: max_iter must be an int >= 1, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{name}: tol must be a finite number >= 0, got {tol!r}")
    if check_every is not None and (
        isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
    ):
        raise ValueError(f"{name}: check_every must be None or an int >= 1, got {check_every!r}")


def _relative_residual(fz: Tensor, z: Tensor) -> Tensor:
    with torch.no_grad():
        tiny = torch.finfo(fz.dtype).tiny
        return torch.linalg.vector_norm(fz - z) / torch.linalg.vector_norm(fz).clamp_min(tiny)


def _check_shape(fz: Tensor, z: Tensor) -> None:
    if fz.shape != z.shape:
        raise ValueError(
            f"the map's output shape {tuple(fz.shape)} differs from the state shape "
            f"{tuple(z.shape)}; a fixed-point map must return a tensor shaped like w "
            "(pass z0 of the right shape or give the map an initial_state(x) method)"
        )


class _Monitor:
    """Residual bookkeeping shared by the solvers: device-side trace, sparse host syncs.

    The residual is computed only at the *checks* (every ``check_every`` map evaluations and
    after the last one): between checks an iteration costs one map evaluation and nothing
    else.  With ``tol > 0`` the host synchronises at each check for the stopping test.
    """

    def __init__(self, name: str, max_iter: int, tol: float, check_every: int | None, like: Tensor):
        if check_every is None:
            check_every = 1 if tol > 0 else max_iter
        self.name, self.max_iter, self.tol, self.check_every = name, max_iter, tol, check_every
        checks = -(-max_iter // check_every) + 1
        self.buffer = torch.full((checks,), math.nan, dtype=like.dtype, device=like.device)
        self.count = 0  # map evaluations
        self.checks = 0  # residuals stored

    def record(self, fz: Tensor, z: Tensor) -> bool:
        """Count one evaluation ``fz = g(z)``; at a check store its relative residual and
        return True when the solve should stop."""
        self.count += 1
        if self.count % self.check_every and self.count != self.max_iter:
            return False
        r = _relative_residual(fz, z)
        self.buffer[self.checks] = r
        self.checks += 1
        if not self.tol > 0:
            return False
        value = float(r)
        if not math.isfinite(value):
            raise NonFiniteError(
                f"{self.name}: the map produced NaN/Inf (relative residual {value}) at "
                f"iteration {self.count}; the map may be expansive (not a contraction)"
            )
        return value <= self.tol

    def finish(self, strict: bool) -> SolverStats:
        trace = self.buffer[: self.checks].tolist()
        residual = trace[-1] if trace else math.nan
        if not math.isfinite(residual):
            raise NonFiniteError(
                f"{self.name}: the map produced NaN/Inf (relative residual {residual}) "
                f"within {self.count} iterations; the map may be expansive"
            )
        converged = self.tol == 0 or residual <= self.tol
        stats = SolverStats(self.count, residual, converged, trace)
        if not converged:
            message = (
                f"{self.name} did not converge: relative residual {residual:.3e} > tol "
                f"{self.tol:.1e} after {self.count} iterations"
            )
            if strict:
                raise ConvergenceError(message)
            warnings.warn(message, ConvergenceWarning, stacklevel=4)
        return stats


@dataclass(frozen=True)
class FixedPointIteration:
    """Damped (Krasnoselskii–Mann) fixed-point iteration ``z ← (1 − β) z + β g(z)``.

    ``damping`` is β ∈ (0, 1]; β = 1 is plain Picard iteration.  Converges linearly with
    rate q when g is a q-contraction.  ``strict=True`` raises :class:`ConvergenceError`
    instead of warning when the tolerance is not reached.
    """

    max_iter: int = 50
    tol: float = 1e-5
    damping: float = 1.0
    check_every: int | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        _check_common("FixedPointIteration", self.max_iter, self.tol, self.check_every)
        if not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"FixedPointIteration: damping must be in (0, 1], got {self.damping!r}")

    def solve(self, g: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        """Iterate from ``z0``; return the last iterate and its :class:`SolverStats`."""
        monitor = _Monitor("FixedPointIteration", self.max_iter, self.tol, self.check_every, z0)
        z, beta = z0, float(self.damping)
        for _ in range(self.max_iter):
            fz = g(z)
            _check_shape(fz, z)
            stop = monitor.record(fz, z)
            z = fz if beta == 1.0 else torch.lerp(z, fz, beta)
            if stop:
                break
        return z, monitor.finish(self.strict)


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (type II) of ``z = g(z)``, batched per sample.

    With the last ``m = memory`` iterates x_i and residuals r_i = g(x_i) − x_i of each sample,
    solve ``min_α ‖Σ α_i r_i‖`` subject to ``Σ α_i = 1`` (ridge ``regularization``, at least
    100 × the dtype's machine epsilon, relative to the Gram matrix's mean diagonal; a sample
    whose system is singular all the same takes a plain step), then
    ``x ← Σ α_i (x_i + mixing · r_i)``.  The first axis of ``z`` is the batch (a 1-D ``z`` is one sample).  Without autograd the history (images,
    residuals and their Gram matrix, one new row per iteration) lives in preallocated buffers
    updated in place; with autograd enabled (ITD through Anderson) it is built out of place.
    Stopping follows :class:`FixedPointIteration`.
    """

    max_iter: int = 50
    tol: float = 1e-5
    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-10
    check_every: int | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        _check_common("Anderson", self.max_iter, self.tol, self.check_every)
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"Anderson: memory must be an int >= 1, got {self.memory!r}")
        if not isinstance(self.mixing, (int, float)) or not 0 < self.mixing <= 1:
            raise ValueError(f"Anderson: mixing must be in (0, 1], got {self.mixing!r}")
        if not isinstance(self.regularization, (int, float)) or not self.regularization >= 0:
            raise ValueError(f"Anderson: regularization must be >= 0, got {self.regularization!r}")

    def solve(self, g: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        """Iterate from ``z0``; return ``g`` of the last extrapolated point and the stats."""
        monitor = _Monitor("Anderson", self.max_iter, self.tol, self.check_every, z0)
        shape = z0.shape
        batch = shape[0] if z0.dim() > 1 else 1
        m, beta = self.memory, float(self.mixing)
        x = z0.reshape(batch, -1)
        # History of images f_i = g(x_i) and residuals r_i = f_i − x_i (so x_i = f_i − r_i) and
        # their Gram matrix H = R Rᵀ, updated one row per iteration.  Without autograd they
        # live in preallocated buffers written in place; with autograd (ITD through Anderson)
        # they are rebuilt out of place.
        in_place = not torch.is_grad_enabled()
        if in_place:
            F = x.new_zeros(batch, m, x.shape[1])
            R = x.new_zeros(batch, m, x.shape[1])
            H = x.new_zeros(batch, m, m)
        else:
            fs: list[Tensor] = []
            rs: list[Tensor] = []
        ridge = max(float(self.regularization), 100 * torch.finfo(x.dtype).eps)
        eye = torch.eye(m, dtype=x.dtype, device=x.device)
        ones = x.new_ones(batch, m, 1)
        tiny = torch.finfo(x.dtype).tiny
        fx = x
        for k in range(self.max_iter):
            fz = g(x.reshape(shape))
            _check_shape(fz, z0)
            fx = fz.reshape(batch, -1)
            stop = monitor.record(fx, x)
            if stop or k == self.max_iter - 1:
                break
            n, slot = min(k + 1, m), k % m
            if in_place:
                r = torch.sub(fx, x, out=R[:, slot])
                F[:, slot].copy_(fx)
                Fh, Rh = F[:, :n], R[:, :n]
                column = torch.bmm(Rh, r.unsqueeze(-1)).squeeze(-1)  # ⟨r_i, r_new⟩, i < n
                H[:, slot, :n] = column
                H[:, :n, slot] = column
                Hh = H[:, :n, :n]
            else:
                fs, rs = (fs + [fx])[-m:], (rs + [fx - x])[-m:]
                Fh, Rh = torch.stack(fs, 1), torch.stack(rs, 1)
                Hh = Rh @ Rh.transpose(1, 2)
            if n == 1:
                x = torch.lerp(x, fx, beta)
                continue
            # min ‖Σ α_i r_i‖² s.t. Σ α_i = 1: α ∝ (H + λI)⁻¹ 1, λ relative to H's scale
            # (scaled to unit mean diagonal: a sample whose residuals are all exactly zero, i.e.
            # converged, gets H = ridge·I and uniform α instead of a singular system)
            scale = Hh.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(tiny)[:, None, None]
            a, info = torch.linalg.solve_ex(Hh / scale + eye[:n, :n] * ridge, ones[:, :n])
            # a sample whose system is still singular puts all weight on the newest point,
            # i.e. takes the plain damped step x + β r
            newest = slot if in_place else n - 1  # where the newest point sits in the history
            a = torch.where((info != 0)[:, None, None], eye[:n, newest : newest + 1], a)
            alpha = (a / a.sum(1, keepdim=True)).transpose(1, 2)  # (batch, 1, n)
            # x ← Σ α_i (x_i + β r_i) = Σ α_i f_i − (1 − β) Σ α_i r_i
            x = (alpha @ Fh).squeeze(1)
            if beta != 1.0:
                x = x - (1.0 - beta) * (alpha @ Rh).squeeze(1)
        return fx.reshape(shape), monitor.finish(self.strict)


ForwardSolver = FixedPointIteration | Anderson
