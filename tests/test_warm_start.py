"""Per-sample warm starts (SampleCache) and the per-sample stopping test of the adjoint solve."""

from __future__ import annotations

import pytest
import torch

import implicitnets as inn
from implicitnets import linear

DT = torch.float64


def layer_and_data(device, backward=None, tol=1e-10):
    torch.manual_seed(0)
    cell = inn.maps.TanhMap(6, 8, contraction=0.8).to(DT).to(device)
    backward = backward or inn.AID(linear.Neumann(max_iter=200, tol=1e-10))
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(max_iter=500, tol=tol), backward=backward)
    X = torch.randn(10, 6, dtype=DT).to(device)
    return cell, layer, X


def grads(layer, x, z0=None, adjoint_x0=None):
    layer.zero_grad()
    layer(x, z0=z0, adjoint_x0=adjoint_x0).square().sum().backward()
    return [p.grad.clone() for p in layer.parameters()], layer.stats


def test_a_warm_start_from_the_cache_saves_iterations_and_keeps_the_gradient(device):
    cell, layer, X = layer_and_data(device)
    cache = inn.SampleCache(len(X))
    index = torch.tensor([3, 7, 1], device=device)
    cold, cold_stats = grads(layer, X[index], z0=cache.start("w", index, cell.initial_state(X[index])),
                             adjoint_x0=cache.start("v", index, None))
    cache.store("w", index, layer(X[index]).detach())
    cache.store("v", index, cold_stats.backward.adjoint)
    warm, warm_stats = grads(layer, X[index], z0=cache.start("w", index, cell.initial_state(X[index])),
                             adjoint_x0=cache.start("v", index, None))
    assert warm_stats.iterations < cold_stats.iterations / 4
    assert warm_stats.backward.iterations < cold_stats.backward.iterations / 4
    for a, b in zip(warm, cold):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_the_cache_returns_stored_rows_by_index_and_defaults_elsewhere(device):
    cache = inn.SampleCache(5)
    assert cache.start("w", torch.tensor([0, 1], device=device), None) is None
    cache.store("w", torch.tensor([4, 1], device=device), torch.tensor([[4.0, 4.0], [1.0, 1.0]], device=device))
    got = cache.start("w", torch.tensor([1, 2, 4], device=device), torch.zeros(3, 2, device=device))
    assert got.tolist() == [[1.0, 1.0], [0.0, 0.0], [4.0, 4.0]]
    assert cache.start("w", torch.tensor([1, 2], device=device), None) is None  # row 2 has no start
    assert cache.start("w", torch.tensor([4, 1], device=device), None).tolist() == [[4.0, 4.0], [1.0, 1.0]]


def test_tuple_states_and_a_state_dict_round_trip(device):
    cache = inn.SampleCache(4)
    cache.store("w", torch.tensor([2], device=device),
                (torch.ones(1, 3, device=device), torch.full((1, 2, 2), 2.0, device=device)))
    restored = inn.SampleCache(4)
    restored.load_state_dict(cache.state_dict())
    a, b = restored.start("w", torch.tensor([2, 0], device=device),
                          (torch.zeros(2, 3, device=device), torch.zeros(2, 2, 2, device=device)))
    assert a.tolist() == [[1.0] * 3, [0.0] * 3] and b[0].eq(2).all() and b[1].eq(0).all()
    torch.save(cache.state_dict(), buf := __import__("io").BytesIO())
    buf.seek(0)
    assert set(torch.load(buf, weights_only=True)) == {"w__seen", "w__0", "w__1"}


@pytest.mark.parametrize("bad", [torch.tensor([5]), torch.tensor([-1]), torch.tensor([[0]]), torch.tensor([0.0]), [0]],
                         ids=["too-large", "negative", "2-D", "float", "list"])
def test_bad_indices_are_named(bad):
    cache = inn.SampleCache(5)
    with pytest.raises(ValueError, match="index"):
        cache.store("w", bad, torch.zeros(1, 2))


def test_mismatched_rows_are_named(device):
    cache = inn.SampleCache(5)
    with pytest.raises(ValueError, match="rows"):
        cache.store("w", torch.tensor([0, 1], device=device), torch.zeros(3, 2, device=device))
    with pytest.raises(ValueError, match="size"):
        inn.SampleCache(0)


def test_per_sample_adjoint_tolerance_holds_for_every_sample(device):
    """A batch whose right-hand sides differ by 1000× in size: the whole-batch test stops while
    the small sample is still far off; the per-sample test brings every sample to tol."""
    c = torch.tensor([[0.5], [0.95]], dtype=DT, device=device)
    op = inn.FunctionOperator(lambda x: x - c * x, torch.zeros(2, 3, dtype=DT, device=device), lambda y: y - c * y)
    b = torch.tensor([[1000.0, 0, 0], [1.0, 1, 1]], dtype=DT, device=device)
    for per_sample, worst_bound in ((False, 1e-4), (True, 1e-6)):
        x, info = linear.Neumann(max_iter=500, tol=1e-6, per_sample=per_sample).solve(op, b)
        worst = float(((b - op.mv(x)).norm(dim=1) / b.norm(dim=1)).max())
        assert info.converged
        if per_sample:
            assert worst <= worst_bound
        else:
            assert worst > worst_bound  # the small sample was left unconverged


def test_per_sample_adjoint_solve_in_aid_matches_the_dense_gradient(device):
    cell, layer, X = layer_and_data(device, inn.AID(linear.Neumann(max_iter=400, tol=1e-12, per_sample=True)))
    got, stats = grads(layer, X)
    _, ref_layer, _ = layer_and_data(device, inn.AID(linear.Exact()))
    ref, _ = grads(ref_layer, X)
    assert stats.backward.converged
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
