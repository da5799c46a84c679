"""Residual bookkeeping shared by the built-in forward solvers.

The relative residual ``‖g(z) − z‖ / max(‖g(z)‖, tiny)`` is computed only at the *checks*:
every ``check_every`` evaluations and after the last.  ``check_every=None`` means every
evaluation when ``tol > 0`` (or ``return_best``) and only after the last when ``tol = 0``.
At a check the norms are taken per sample (each sample's rows of every part of the state),
and the residual of the whole batch is derived from those per-sample norms: one pass over
the state gives both.  With ``tol = 0`` (and inside ``torch.compile``) the residuals stay on
the device and the host synchronises once, at the end.  With ``tol > 0`` a stopping check
reads the batch's two norms at once and forms the residual on the host, where the stopping
test needs it.  Norms are accumulated in at least float32, whatever the state's dtype
(bfloat16 or float16 under autocast), and taken over each sample's axes in place (a
channels-last state is not copied).

Per-sample control (``freeze_converged``, ``return_best``) is decided here too: at a check
the :class:`Monitor` says which samples leave the *active set* (converged, or — with
``return_best`` — non-finite); the solver then drops them from its working tensors
(:attr:`Monitor.keep`) and iterates the rest with :meth:`Monitor.restrict`, while the
monitor keeps the samples that left and assembles the full-batch result in
:meth:`Monitor.finish`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..backward_stats import BackwardStats
from ..errors import NonFiniteError
from ..failure import FailurePolicy
from ..state import State, batch_size, map_parts, parts
from ..transforms import host_read, physical, read, transforms_active, under_vmap
from .base import SolverStats
from .rows import put_rows, restrict, take_rows, where_rows

__all__ = ["Monitor", "check_structure", "sample_norms"]


def check_structure(fz: State, z: State) -> None:
    """The map's output must be a state of the same structure and shapes as its input."""
    a, b = parts(fz), parts(z)
    if isinstance(fz, Tensor) != isinstance(z, Tensor) or len(a) != len(b) or any(
        x.shape != y.shape for x, y in zip(a, b)
    ):
        raise ValueError(
            f"the map's output {[tuple(t.shape) for t in a]} does not match the state "
            f"{[tuple(t.shape) for t in b]} it was given; a fixed-point map must return a state "
            "shaped like w (pass z0 of the right shape or give the map an initial_state(x) method)"
        )


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def sample_norms(fz: State, z: State, batch: int, scratch: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per sample ``‖fz_b − z_b‖`` and ``‖fz_b‖`` over all parts, shape ``(batch,)``, in ≥ float32.

    ``scratch`` (a list, filled on the first call) holds the differences' buffers for the next
    call with states of the same shapes and dtypes: a solve's checks then write ``fz − z``
    into the same memory instead of fresh memory each time (whose first touch is what a large
    state's subtraction costs most on CPU)."""
    with torch.no_grad():
        a, b = parts(fz), parts(z)
        dtype = _work_dtype(a[0])
        diffs = [_diff(x, y, dtype, _buffer(scratch, i, x, dtype)) for i, (x, y) in enumerate(zip(a, b))]
        if scratch is not None:
            scratch[:] = diffs
        nums = [_row_norms(d, batch) for d in diffs]
        dens = [_row_norms(x, batch, dtype) for x in a]
        if len(nums) == 1:
            return nums[0], dens[0]
        return torch.stack(nums).square().sum(0).sqrt(), torch.stack(dens).square().sum(0).sqrt()


def _buffer(scratch: list[Tensor] | None, i: int, like: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The ``i``-th buffer of ``scratch`` if it fits ``like`` (shape, dtype, device, strides)."""
    if scratch is None or i >= len(scratch):
        return None
    out = scratch[i]
    if out.shape != like.shape or out.dtype != dtype or out.device != like.device or out.stride() != like.stride():
        return None
    return out


def _diff(x: Tensor, y: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``x − y`` in ``dtype`` (into ``out`` when given)."""
    if x.dtype == y.dtype == dtype:
        return x - y if out is None else torch.sub(x, y, out=out)
    return x.to(dtype) - y.to(dtype)


def _row_norms(x: Tensor, batch: int, dtype: torch.dtype | None = None) -> Tensor:
    """The norm of each of the ``batch`` samples (first axis) of ``x``, reduced over the other
    axes in place (no copy of a channels-last or otherwise strided state)."""
    if x.dim() < 2 or x.shape[0] != batch:
        return torch.linalg.vector_norm(x.reshape(batch, -1), dim=1, dtype=dtype)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), dtype=dtype)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


class Monitor:
    """Counts evaluations, stores residuals at the checks, decides when to stop and which
    samples leave the active set.

    A solver calls :meth:`record` after every evaluation ``fz = g(z)`` of its active
    samples, with ``out`` the state it would return if it stopped there; when that returns
    True it stops.  After a check at which samples left, :attr:`keep` holds the rows (of the
    previous active set) that stay: the solver selects them in its working tensors and
    evaluates :meth:`restrict` ``(g)`` from then on.  :meth:`finish` takes the last ``out``
    and returns the full-batch result and the :class:`SolverStats` (``out`` as passed to
    the last :meth:`record`, before the solver selected :attr:`keep`).
    """

    def __init__(
        self,
        name: str,
        max_iter: int,
        tol: float,
        check_every: int | None,
        like: State,
        *,
        freeze: bool = False,
        best: bool = False,
    ) -> None:
        first = parts(like)[0]
        #: inside ``vmap``: one iteration for all mapped problems, stopped on their joint
        #: residual (read from the plain tensors under the transform), no per-sample control
        self.joint = under_vmap(first)
        if self.joint:
            freeze = best = False
        if check_every is None:
            check_every = 1 if tol > 0 or best else max_iter
        self.name, self.max_iter, self.tol, self.check_every = name, max_iter, tol, check_every
        self.freeze, self.best = freeze and tol > 0, best
        self.per_sample = self.freeze or self.best
        dtype, device = _work_dtype(first), first.device
        self.batch = self.n = batch_size(like)
        checks = -(-max_iter // check_every) + 1
        self.buffer = torch.full((checks,), math.nan, dtype=dtype, device=device)
        #: the residuals at the checks, read on the host (``tol > 0``, eager, whole batch)
        self.host_trace: list[float] = []
        self.tiny = torch.finfo(dtype).tiny
        #: the buffers of ``g(z) − z`` reused from check to check (:func:`sample_norms`)
        self.scratch: list[Tensor] = []
        self.count = 0  # map evaluations
        self.checks = 0  # residuals stored
        #: rows of the previous active set that stay, after a check at which samples left
        self.keep: Tensor | None = None
        self.index: Tensor | None = None  # the active samples' indices in the batch (None: all)
        self.num: Tensor | None = None  # per sample ‖g(z) − z‖ and ‖g(z)‖ at its last check
        self.den: Tensor | None = None
        if self.per_sample:
            self.num = torch.zeros(self.batch, dtype=dtype, device=device)
            self.den = torch.zeros(self.batch, dtype=dtype, device=device)
            self.last = torch.zeros(self.batch, dtype=dtype, device=device)  # active samples' residuals
            self.left_at = torch.full((self.batch,), -1, dtype=torch.long, device=device)
            self.failed = torch.zeros(self.batch, dtype=torch.bool, device=device)
            self.result: State | None = None  # the full batch; rows of samples that left are final
        if self.best:
            # each active sample's lowest-residual iterate, its residual and norms
            self.best_state: State = like
            self.best_res = torch.full((self.batch,), math.inf, dtype=dtype, device=device)
            self.best_num = torch.full((self.batch,), math.inf, dtype=dtype, device=device)
            self.best_den = torch.ones(self.batch, dtype=dtype, device=device)

    def record(self, fz: State, z: State, out: State | None = None) -> bool:
        """Count one evaluation ``fz = g(z)`` of the active samples; at a check store the
        residuals and return True when the solve should stop.  ``out`` (needed with
        ``return_best`` or freezing; default ``fz``) is what the solver would return now."""
        self.count += 1
        self.keep = None
        if self.count % self.check_every and self.count != self.max_iter:
            return False
        # a reused buffer holds plain tensors only (not those of a torch.func transform)
        plain = not self.joint and not transforms_active(parts(fz)[0])
        num, den = sample_norms(fz, z, self.n, self.scratch if plain else None)
        if self.joint:
            num, den = physical(num), physical(den)
        if self.per_sample:
            return self._record_samples(num, den, fz if out is None else out)
        return self.record_norms(num, den)

    def record_norms(self, num: Tensor, den: Tensor) -> bool:
        """At a check (the whole batch active): store the residual of the per-sample norms
        ``num = ‖g(z)_b − z_b‖`` and ``den = ‖g(z)_b‖`` and return True when the solve should
        stop.  :meth:`record` calls it; a compiled loop that counts its evaluations itself
        (adding them to :attr:`count`) calls it at the end of each chunk.

        With ``tol > 0`` (eager) the two batch norms are read at once and the residual is
        formed and kept on the host, the read the stopping test needs anyway; otherwise it
        stays on the device (:attr:`buffer`) and nothing is read."""
        self.num, self.den = num, den
        if self.tol > 0 and not torch.compiler.is_compiling():
            with torch.no_grad():
                top, bottom = read(torch.linalg.vector_norm(torch.stack([num, den]), dim=1))
            value = top / max(bottom, self.tiny)
            self.host_trace.append(value)
        else:
            with torch.no_grad():
                r = _ratio(torch.linalg.vector_norm(num), torch.linalg.vector_norm(den))
                self.buffer[self.checks] = r
            if not self.tol > 0:
                self.checks += 1
                return False
            value = read(r)
        self.checks += 1
        self._check_finite(value)
        return value <= self.tol

    def _check_finite(self, value: float) -> None:
        """Raise :class:`NonFiniteError` when the residual read at a check is NaN or Inf."""
        if not math.isfinite(value):
            raise NonFiniteError(
                f"{self.name}: the map produced NaN/Inf (relative residual {value}) at "
                f"iteration {self.count}; the map may be expansive (not a contraction)"
            )

    def _record_samples(self, num: Tensor, den: Tensor, out: State) -> bool:
        with torch.no_grad():
            res = _ratio(num, den)
            leave = res <= self.tol if self.freeze else torch.zeros_like(res, dtype=torch.bool)
            failed = None
            if self.best:
                better = res < self.best_res  # False for NaN
                self.best_res = torch.where(better, res, self.best_res)
                self.best_num = torch.where(better, num, self.best_num)
                self.best_den = torch.where(better, den, self.best_den)
                failed = ~torch.isfinite(res)
                leave = leave | failed
        if self.best:
            self.best_state = where_rows(better, out, self.best_state)
        with torch.no_grad():
            if self.index is None:
                self.num, self.den = num, den
            else:
                self.num.index_copy_(0, self.index, num)
                self.den.index_copy_(0, self.index, den)
            self.last = res
            # the stopping residual: the whole batch, less the samples set aside as non-finite
            tn, td = self.num, self.den
            if self.best:
                gone = failed if self.index is None else self.failed.index_copy(0, self.index, failed)
                tn, td = tn.masked_fill(gone, 0.0), td.masked_fill(gone, 0.0)
            r = _ratio(torch.linalg.vector_norm(tn), torch.linalg.vector_norm(td))
            self.buffer[self.checks] = r
            value, leaving = read(torch.stack([r, leave.sum().to(r.dtype)]))  # one host sync
        self.checks += 1
        if not self.best:
            self._check_finite(value)
        if leaving:
            self._leave(leave, failed, out)
        if self.n == 0:
            return True
        return not self.freeze and self.tol > 0 and value <= self.tol

    def _leave(self, leave: Tensor, failed: Tensor | None, out: State) -> None:
        """The samples ``leave`` (of the active set) stop: store their final values."""
        value = out if failed is None else where_rows(failed, self.best_state, out)
        with torch.no_grad():
            rows = leave.nonzero().squeeze(1)
            where = rows if self.index is None else self.index[rows]
            self.left_at.index_fill_(0, where, self.count)
            if failed is not None:
                self.failed.index_copy_(0, where, failed[rows])
                self.num.index_copy_(0, where, torch.where(failed, self.best_num, self._num_active())[rows])
                self.den.index_copy_(0, where, torch.where(failed, self.best_den, self._den_active())[rows])
        in_place = not torch.is_grad_enabled()
        if rows.numel() == self.n:  # every active sample left
            self.result = value if self.index is None else put_rows(self.result, self.index, value, in_place=in_place)
            self.n = 0
            return
        if self.result is None:
            self.result = map_parts(lambda t: t.new_zeros((self.batch, *t.shape[1:])), value)
            in_place = True
        self.result = put_rows(self.result, where, take_rows(value, rows), in_place=in_place)
        with torch.no_grad():
            stay = (~leave).nonzero().squeeze(1)
        self.keep = stay
        self.index = stay if self.index is None else self.index[stay]
        self.n = stay.numel()
        self.last = self.last[stay]
        if self.best:
            self.best_state = take_rows(self.best_state, stay)
            self.best_res, self.best_num, self.best_den = (
                t[stay] for t in (self.best_res, self.best_num, self.best_den)
            )

    def _num_active(self) -> Tensor:
        return self.num if self.index is None else self.num[self.index]

    def _den_active(self) -> Tensor:
        return self.den if self.index is None else self.den[self.index]

    def restrict(self, g: Callable[[State], State]) -> Callable[[State], State]:
        """``g`` on the active samples (``g`` itself while every sample is active)."""
        if self.index is None:
            return g
        return restrict(g, self.index, self.result)

    def finish(self, out: State, policy: FailurePolicy) -> tuple[State, SolverStats]:
        """The full-batch result (``out`` for the active samples) and the statistics; a
        solve that did not converge goes to ``policy.forward_failed``.

        Inside ``torch.compile`` (without per-sample control) nothing is read on the host:
        the statistics are tensors (:meth:`traced_stats`) and ``policy`` is not consulted.
        """
        if torch.compiler.is_compiling() and not self.per_sample:
            if self.keep is not None:
                out = take_rows(out, self.keep)
            return out, self.traced_stats()
        return self._finish(out, policy)

    def traced_stats(self) -> SolverStats:
        """The statistics as tensors, with no host read: ``residual`` (0-D) and ``trace``
        (1-D) on the state's device, ``converged`` a 0-D bool tensor when ``tol > 0``
        (``True`` for ``tol = 0``); a NaN residual is not raised."""
        with torch.no_grad():
            trace = self.buffer[: self.checks]
            residual = trace[-1] if self.checks else self.buffer[0]
            sample_residual = _ratio(self.num, self.den) if self.num is not None else None
            if self.tol > 0:
                converged = residual <= self.tol
                sample_converged = None if sample_residual is None else sample_residual <= self.tol
            else:
                converged = True
                sample_converged = None
                if sample_residual is not None:
                    sample_converged = torch.ones_like(sample_residual, dtype=torch.bool)
            iterations = None
            if sample_residual is not None:
                iterations = torch.full_like(sample_residual, self.count, dtype=torch.long)
        # BackwardStats given explicitly: Dynamo does not trace the dataclass's default_factory call
        return SolverStats(self.count, residual, converged, trace, sample_residual, sample_converged, iterations,
                           BackwardStats(iterations=None))

    @host_read
    def _finish(self, out: State, policy: FailurePolicy) -> tuple[State, SolverStats]:
        if self.keep is not None:  # samples left at the last check: `out` still holds them
            out = take_rows(out, self.keep)
        trace = self.host_trace if self.host_trace else self.buffer[: self.checks].tolist()
        tested = trace[-1] if trace else math.nan
        if not self.per_sample:
            result, num, den = out, self.num, self.den
            failed = None
            if not math.isfinite(tested):
                raise NonFiniteError(
                    f"{self.name}: the map produced NaN/Inf (relative residual {tested}) "
                    f"within {self.count} iterations; the map may be expansive"
                )
        else:
            result = self._assemble(out)
            num, den, failed = self.num, self.den, self.failed
        with torch.no_grad():
            sample_residual = _ratio(num, den)
            if self.tol > 0:
                sample_converged = sample_residual <= self.tol
            else:
                sample_converged = torch.ones_like(sample_residual, dtype=torch.bool)
            if failed is not None:
                sample_converged = sample_converged & ~failed
            if self.per_sample:
                iterations = torch.where(self.left_at >= 0, self.left_at, self.count)
                residual = float(_ratio(torch.linalg.vector_norm(num), torch.linalg.vector_norm(den)))
            else:
                iterations = torch.full_like(sample_residual, self.count, dtype=torch.long)
                residual = tested
        n_failed = int(failed.sum()) if failed is not None else 0
        if self.freeze:
            converged = bool(sample_converged.all())
        else:
            converged = (self.tol == 0 or tested <= self.tol) and n_failed == 0
        stats = SolverStats(
            self.count, residual, converged, trace, sample_residual, sample_converged, iterations
        )
        if not converged:
            missed = int((~sample_converged).sum())
            message = (
                f"{self.name} did not converge: relative residual {residual:.3e} (tol {self.tol:.1e}) "
                f"after {self.count} iterations; {missed} of {self.batch} samples did not converge"
            )
            if n_failed:
                message += f" ({n_failed} turned NaN/Inf and were returned at their best finite iterate)"
            policy.forward_failed(message)
        return result, stats

    def _assemble(self, out: State) -> State:
        """The full batch: the samples that left as stored, the active ones from ``out``
        (with ``return_best``, at their best iterate where they did not converge)."""
        if self.n == 0:
            return self.result
        if self.best and self.tol > 0:
            worse = ~(self.last <= self.tol)
            out = where_rows(worse, self.best_state, out)
            with torch.no_grad():
                num = torch.where(worse, self.best_num, self._num_active())
                den = torch.where(worse, self.best_den, self._den_active())
                if self.index is None:
                    self.num, self.den = num, den
                else:
                    self.num.index_copy_(0, self.index, num)
                    self.den.index_copy_(0, self.index, den)
        if self.index is None:
            return out
        return put_rows(self.result, self.index, out, in_place=not torch.is_grad_enabled())
