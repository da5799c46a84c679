"""Anderson and Broyden keep their history in place without autograd and out of place with
it: the two paths must take the same steps, iteration by iteration (float64)."""

from __future__ import annotations

import pytest
import torch

import implicitnets as inn

pytestmark = pytest.mark.usefixtures("float64")

SOLVERS = [
    inn.Anderson(max_iter=14, tol=0.0, check_every=1, memory=3),
    inn.Anderson(max_iter=14, tol=0.0, check_every=1, memory=4, mixing=0.7),
    inn.Anderson(max_iter=14, tol=0.0, check_every=1, memory=1),
    inn.Broyden(max_iter=14, tol=0.0, check_every=1, memory=4),
]


def _tanh_map(seed: int, batch: int, n: int, q: float, device: torch.device):
    """``z ↦ tanh(W z + u)`` with ``‖W‖₂ = q`` (drawn on the CPU, computed on ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=gen)
    W = (q * W / torch.linalg.matrix_norm(W, 2)).to(device)
    u = torch.randn(batch, n, generator=gen).to(device)
    return lambda z: torch.tanh(z @ W.T + u)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_in_place_and_autograd_paths_take_the_same_steps(solver, device):
    g = _tanh_map(0, 6, 30, 0.95, device=device)
    with torch.no_grad():
        fast, s_fast = solver.solve(g, torch.zeros(6, 30, device=device))
    with torch.enable_grad():
        slow, s_slow = solver.solve(g, torch.zeros(6, 30, device=device))
    assert len(s_fast.trace) == 14 and s_fast.trace[-1] > 1e-8  # compared before convergence
    torch.testing.assert_close(torch.tensor(s_fast.trace), torch.tensor(s_slow.trace), rtol=1e-10, atol=0)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=0)


def test_anderson_with_memory_one_is_damped_iteration(device):
    g = _tanh_map(1, 3, 10, 0.9, device=device)
    with torch.no_grad():
        aa, _ = inn.Anderson(max_iter=9, tol=0.0, memory=1, mixing=0.6).solve(g, torch.zeros(3, 10, device=device))
        fp, _ = inn.FixedPointIteration(max_iter=8, tol=0.0, damping=0.6).solve(g, torch.zeros(3, 10, device=device))
    torch.testing.assert_close(aa, g(fp), rtol=1e-13, atol=0)
