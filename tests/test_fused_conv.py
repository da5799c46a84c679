"""The fused CPU step of the conv cell (maps.fused_conv): the plain step's values, taken only
where it is safe (no autograd, float32, CPU, outside transforms)."""

import pytest
import torch
import torch.nn.functional as F

import implicitnets as inn
from implicitnets.maps import fused_conv
from implicitnets.maps.fused_conv import fused_conv_step

needs_fused = pytest.mark.skipif(fused_conv._FUSED is None, reason="PyTorch built without oneDNN")


def plain(z, u, weight, activation):
    return {"relu": torch.relu, "tanh": torch.tanh}[activation](F.conv2d(z, weight, None, 1, 1) + u)


@needs_fused
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_step_equals_the_plain_step(channels_last):
    activation = "relu"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 6, 7, 7, generator=g)
    u = torch.randn(5, 6, 7, 7, generator=g)
    w = torch.randn(6, 6, 3, 3, generator=g) / 6
    if channels_last:
        z, u = (t.contiguous(memory_format=torch.channels_last) for t in (z, u))
    with torch.no_grad():
        got = fused_conv_step(z, u, w, (1, 1), activation)
    assert got is not None
    want = plain(z, u, w, activation)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_fused
def test_fused_step_declines_where_it_would_be_wrong():
    z, u, w = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5), torch.randn(3, 3, 3, 3)
    assert fused_conv_step(z, u, w.requires_grad_(), (1, 1), "relu") is None  # autograd records
    w = w.detach()
    with torch.no_grad():
        assert fused_conv_step(z.double(), u.double(), w.double(), (1, 1), "relu") is None  # float64
        assert fused_conv_step(z, u, w, (1, 1), "tanh") is None  # not a post-op after the sum
        assert fused_conv_step(z, u, w, (1, 1), "relu") is not None


def test_conv_cell_solve_is_unchanged_by_the_fused_step(monkeypatch):
    """A solve under no_grad (fused steps) gives the fixed point of the plain steps."""
    torch.manual_seed(0)
    cell = inn.maps.ConvCell(2, 4, (6, 6))
    layer = inn.FixedPointLayer(cell, solver=inn.FixedPointIteration(max_iter=60, tol=1e-6),
                                backward=inn.JacobianFree())
    x = torch.randn(3, 2, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = layer(x)
    monkeypatch.setattr(fused_conv, "_FUSED", None)
    with torch.no_grad():
        reference = layer(x)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    assert fused.is_contiguous(memory_format=torch.channels_last)  # the state keeps the input's format
