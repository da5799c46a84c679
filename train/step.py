"""One guarded optimiser step, with one policy for everything non-finite.

A step is *taken* only if the forward pass, the loss, the backward pass and every gradient
are finite (a solver's :class:`~implicitnets.NonFiniteError` or a failed adjoint solve's
:class:`~implicitnets.ConvergenceError` counts as non-finite).  Otherwise it is *skipped*:
the gradients are dropped and the weights and optimiser state stay as they were.  A step
that was taken but left a non-finite weight is *undone*: the weights return to their values
before the step (the optimiser's moment estimates, computed from finite gradients, are kept).
Either way the caller gets the reason and decides how to log it.

Under ``torch.distributed`` every decision is collective, so replicas never diverge.  No
collective runs inside the backward pass (a ``DistributedDataParallel`` model passed as
``ddp`` runs forward and backward under its ``no_sync()``), so a process whose forward or
backward raises cannot leave another waiting there.  After the backward each process
contributes one flag to a single ``all_reduce``; if any process failed, every process
skips; otherwise the gradients are averaged in one flattened ``all_reduce`` (what DDP would
have done) and every process takes the same step.  A process that stops answering (killed,
or hung) makes the others raise :class:`PeerLostError` once the process group's timeout
has passed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

import implicitnets as inn

__all__ = ["StepOutcome", "PeerLostError", "guarded_step", "guarded_all_reduce", "guarded_barrier", "all_finite"]


@dataclass(frozen=True)
class StepOutcome:
    """``loss`` and ``output`` of the forward pass (``None`` if it failed); ``skipped`` is
    ``""`` for a step taken, else why it was skipped or undone."""

    loss: Tensor | None
    output: Tensor | None
    skipped: str


class PeerLostError(RuntimeError):
    """A guarded collective (a step's, an epoch's or an evaluation's sums, a barrier) failed:
    another process died or did not answer within the process group's timeout.  The replicas
    can no longer agree; restart from the last checkpoint."""


def all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """True if every tensor (``None`` ignored) holds only finite values (one host sync)."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in present]).all())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def guarded_all_reduce(tensor: Tensor, what: str, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    """``dist.all_reduce`` that names a lost process instead of a backend error
    (:class:`PeerLostError`)."""
    try:
        dist.all_reduce(tensor, op=op)
    except (RuntimeError, ConnectionError) as err:  # gloo / nccl report a dead peer or a timeout so
        raise _lost(f"the all_reduce of the {what}", err) from err


def guarded_barrier(what: str) -> None:
    """``dist.barrier`` that names a lost process instead of a backend error
    (:class:`PeerLostError`)."""
    try:
        dist.barrier()
    except (RuntimeError, ConnectionError) as err:
        raise _lost(f"the barrier {what}", err) from err


def _lost(collective: str, err: BaseException) -> PeerLostError:
    return PeerLostError(
        f"rank {dist.get_rank()}: {collective} failed: another process died or did not answer "
        f"within the process group's timeout ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    )


def _agree(failed: bool, params: Sequence[Tensor]) -> tuple[bool, list[bool]]:
    """One all_reduce: whether any process failed, and for each parameter whether any
    process has a gradient for it."""
    flags = [1.0 if failed else 0.0] + [0.0 if p.grad is None else 1.0 for p in params]
    flag = torch.tensor(flags, device=params[0].device)
    guarded_all_reduce(flag, "failure flags", dist.ReduceOp.MAX)
    values = flag.tolist()
    return values[0] > 0, [v > 0 for v in values[1:]]


def _average_gradients(params: Sequence[Tensor], present: list[bool]) -> None:
    """Average the gradients over the processes in one flattened all_reduce; a parameter
    whose gradient is ``None`` everywhere stays ``None``, one missing on some processes
    counts as zero there."""
    with torch.no_grad():
        used = [p for p, keep in zip(params, present) if keep]
        if not used:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in used]
        bucket = torch.cat([g.reshape(-1) for g in grads])
        guarded_all_reduce(bucket, "gradients")
        bucket /= dist.get_world_size()
        for p, chunk in zip(used, torch.split(bucket, [g.numel() for g in grads])):
            if p.grad is None:
                p.grad = chunk.view_as(p).clone()
            else:
                p.grad.copy_(chunk.view_as(p))


def _local_step(forward: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor | None, Tensor | None, str]:
    """Forward and backward on this process; returns ``(loss, output, reason)``."""
    loss = output = None
    try:
        loss, output = forward()
        if not bool(torch.isfinite(loss.detach())):
            return loss, output, "non-finite loss"
    except inn.ConvergenceError as err:
        return loss, output, f"forward solve diverged: {err}"
    except inn.NonFiniteError as err:
        return loss, output, f"forward: {err}"
    try:
        loss.backward()
    except inn.ConvergenceError as err:
        return loss, output, f"adjoint solve diverged: {err}"
    except inn.NonFiniteError as err:
        return loss, output, f"backward: {err}"
    return loss, output, ""


def guarded_step(
    params: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    forward: Callable[[], tuple[Tensor, Tensor]],
    after_step: Callable[[], None] | None = None,
    ddp: nn.parallel.DistributedDataParallel | None = None,
) -> StepOutcome:
    """Zero the gradients, run ``forward() -> (loss, output)``, backpropagate ``loss``, and take
    ``optimizer.step()`` (then ``after_step()``, e.g. a projection) under the policy above.

    Under ``torch.distributed`` (more than one process) the gradients of ``params`` (every
    trainable parameter of the replicated model) are averaged here: pass the
    ``DistributedDataParallel`` wrapper that ``forward`` calls as ``ddp`` so that DDP itself
    does not reduce them inside the backward.  ``forward`` must call that model
    on every process before anything in it can raise (DDP's forward broadcasts the buffers,
    a collective); the layer's own input checks run inside the model.
    """
    optimizer.zero_grad(set_to_none=True)
    distributed = _distributed()
    no_sync = ddp.no_sync() if distributed and ddp is not None else contextlib.nullcontext()
    with no_sync:
        loss, output, reason = _local_step(forward)
    if not reason and not all_finite([p.grad for p in params]):
        reason = "non-finite gradient"
    if distributed:
        any_failed, present = _agree(bool(reason), params)
        if any_failed and not reason:
            reason = "another process failed"
        if not reason:
            _average_gradients(params, present)
            if not all_finite([p.grad for p in params]):  # the same sum on every process
                reason = "non-finite gradient after averaging"
    if reason:
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss, output, reason)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    if after_step is not None:
        after_step()
    if not all_finite(params):
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(old)
        return StepOutcome(loss, output, "non-finite weights after the step: undone")
    return StepOutcome(loss, output, "")
