"""train.step.guarded_step: one policy for everything non-finite (skip, or undo), exact state checks."""

from __future__ import annotations

import pytest
import torch

import implicitnets as inn
from train.step import all_finite, guarded_step


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    return model, optimizer, x, y


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, before):
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_finite_step_is_taken():
    model, optimizer, x, y = _setup()
    before = _snapshot(model)
    outcome = guarded_step(list(model.parameters()), optimizer,
                           lambda: (torch.nn.functional.cross_entropy(model(x), y), model(x)))
    assert outcome.skipped == "" and torch.isfinite(outcome.loss)
    assert not _unchanged(model, before) and len(optimizer.state) == 2


@pytest.mark.parametrize("fault, reason", [
    ("loss", "non-finite loss"),
    ("gradient", "non-finite gradient"),
    ("forward-error", "forward: "),
    ("adjoint-error", "adjoint solve diverged"),
])
def test_a_failed_step_is_skipped_and_leaves_weights_and_optimizer_state_alone(fault, reason):
    model, optimizer, x, y = _setup()
    before = _snapshot(model)

    def forward():
        out = model(x)
        if fault == "forward-error":
            raise inn.NonFiniteError("NaN in the forward solve")
        loss = torch.nn.functional.cross_entropy(out, y)
        if fault == "loss":
            loss = loss * float("nan")
        if fault == "gradient":  # finite value, NaN gradient: d/dw sqrt(w - w) at 0
            loss = loss + torch.sqrt(model.weight.sum() - model.weight.sum())
        if fault == "adjoint-error":
            loss = _RaiseInBackward.apply(loss)
        return loss, out

    outcome = guarded_step(list(model.parameters()), optimizer, forward)
    assert outcome.skipped.startswith(reason), outcome.skipped
    assert _unchanged(model, before) and len(optimizer.state) == 0
    assert all(p.grad is None for p in model.parameters())


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise inn.ConvergenceError("adjoint residual above its start")


def test_a_step_that_leaves_a_non_finite_weight_is_undone():
    model, optimizer, x, y = _setup()
    before = _snapshot(model)

    def poison():
        with torch.no_grad():
            model.bias[0] = float("inf")

    outcome = guarded_step(list(model.parameters()), optimizer,
                           lambda: (torch.nn.functional.cross_entropy(model(x), y), model(x)), after_step=poison)
    assert outcome.skipped == "non-finite weights after the step: undone"
    assert _unchanged(model, before)


def test_all_finite():
    assert all_finite([torch.ones(2), None]) and all_finite([])
    assert not all_finite([torch.ones(2), torch.tensor([1.0, float("nan")])])
