"""Memory over a long run: no growth over 2,000 training steps, nothing kept from the last step.

A small FC equilibrium classifier trains for 2,000 steps in every backward mode; the
process's resident set size after step 2,000 must be within 5 % of its value after step 200
and the number of live tensors must not grow.  Separately, with the cyclic garbage
collector off, the previous step's output, loss and statistics must be freed by reference
counting alone once the next step has run: the layer keeps no reference to an old graph
(``layer.stats`` holds detached tensors only).  ``benchmarks/memory_growth.py`` prints the
RSS curves.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import implicitnets as inn
from implicitnets import linear

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = [
    inn.ITD(),
    inn.AID(linear.Neumann(max_iter=5, tol=0.0)),
    inn.AID(linear.GMRES(max_iter=5, tol=0.0, restart=5)),
    inn.JacobianFree(),
]
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def make_model(backward: inn.BackwardMode) -> tuple[nn.Module, inn.FixedPointLayer]:
    torch.manual_seed(0)
    layer = inn.FixedPointLayer(inn.maps.TanhMap(6, 8, contraction=0.9),
                                solver=inn.FixedPointIteration(max_iter=5, tol=0.0), backward=backward)
    return nn.Sequential(layer, nn.Linear(8, 3)), layer


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads RSS from /proc/self/statm")
@pytest.mark.parametrize("backward", MODES, ids=repr)
def test_memory_does_not_grow_over_2000_steps(backward):
    model, _ = make_model(backward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    for step in range(1, 2001):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step == 200:
            rss_200, tensors_200 = rss_bytes(), live_tensors()
    rss_2000, tensors_2000 = rss_bytes(), live_tensors()
    assert rss_2000 <= 1.05 * rss_200, (rss_200 / 2**20, rss_2000 / 2**20)
    assert tensors_2000 <= tensors_200
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backward", MODES, ids=repr)
def test_the_layer_keeps_nothing_of_the_previous_step(backward):
    model, layer = make_model(backward)
    x, y = torch.randn(4, 6, requires_grad=True), torch.randint(0, 3, (4,))
    enabled = gc.isenabled()
    gc.disable()  # freed by reference counting alone: no cycle through the old graph
    try:
        out = layer(x)
        loss = nn.functional.cross_entropy(model[1](out), y)
        loss.backward()
        stats = layer.stats
        tensors = [v for v in vars(stats).values() if torch.is_tensor(v)]
        assert all(not t.requires_grad and t.grad_fn is None for t in tensors)
        old = [weakref.ref(out), weakref.ref(loss), weakref.ref(stats), *map(weakref.ref, tensors)]
        del out, loss, stats, tensors
        nn.functional.cross_entropy(model(x), y).backward()  # the next step
        assert [r() is None for r in old] == [True] * len(old)
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("backward", MODES, ids=repr)
def test_an_output_dropped_without_backward_is_freed(backward):
    """A forward whose output is never backpropagated (e.g. a skipped step) leaves nothing behind."""
    _, layer = make_model(backward)
    enabled = gc.isenabled()
    gc.disable()
    try:
        out = layer(torch.randn(4, 6, requires_grad=True))
        ref = weakref.ref(out)
        del out
        assert ref() is None
    finally:
        if enabled:
            gc.enable()
