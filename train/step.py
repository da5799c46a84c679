"""One guarded optimiser step, with one policy for everything non-finite.

A step is *taken* only if the forward pass, the loss, the backward pass and every gradient
are finite (a solver's :class:`~implicitnets.NonFiniteError` or a failed adjoint solve's
:class:`~implicitnets.ConvergenceError` counts as non-finite).  Otherwise it is *skipped*:
the gradients are dropped and the weights and optimiser state stay as they were.  A step
that was taken but left a non-finite weight is *undone*: the weights return to their values
before the step (the optimiser's moment estimates, computed from finite gradients, are kept).
Either way the caller gets the reason and decides how to log it.

Under ``torch.distributed`` the decision is collective: if any process fails, every process
skips, so replicas never diverge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

import implicitnets as inn

__all__ = ["StepOutcome", "guarded_step", "all_finite"]


@dataclass(frozen=True)
class StepOutcome:
    """``loss`` and ``output`` of the forward pass (``None`` if it failed); ``skipped`` is
    ``""`` for a step taken, else why it was skipped or undone."""

    loss: Tensor | None
    output: Tensor | None
    skipped: str


def all_finite(tensors: Sequence[Tensor | None]) -> bool:
    """True if every tensor (``None`` ignored) holds only finite values (one host sync)."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in present]).all())


def _agree(failed: bool, device: torch.device) -> bool:
    """True if this or any other process failed."""
    if not (dist.is_available() and dist.is_initialized()):
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def guarded_step(
    params: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    forward: Callable[[], tuple[Tensor, Tensor]],
    after_step: Callable[[], None] | None = None,
) -> StepOutcome:
    """Zero the gradients, run ``forward() -> (loss, output)``, backpropagate ``loss``, and take
    ``optimizer.step()`` (then ``after_step()``, e.g. a projection) under the policy above."""
    optimizer.zero_grad(set_to_none=True)
    loss = output = None
    reason = ""
    try:
        loss, output = forward()
        if not bool(torch.isfinite(loss.detach())):
            reason = "non-finite loss"
    except inn.ConvergenceError as err:
        reason = f"forward solve diverged: {err}"
    except inn.NonFiniteError as err:
        reason = f"forward: {err}"
    device = params[0].device
    if _agree(bool(reason), device) and not reason:
        reason = "another process failed"
    if not reason:
        try:
            loss.backward()
        except inn.ConvergenceError as err:
            reason = f"adjoint solve diverged: {err}"
        except inn.NonFiniteError as err:
            reason = f"backward: {err}"
    if not reason and not all_finite([p.grad for p in params]):
        reason = "non-finite gradient"
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
