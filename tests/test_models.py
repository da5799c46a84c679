"""models/: the equilibrium classifiers and their explicit baselines (float64)."""

from __future__ import annotations

import pytest
import torch

import implicitnets as inn
from implicitnets import linear
from models import CNN, MLP, ConvEquilibrium, FCEquilibrium, count_parameters


def test_parameter_counts_match_their_baselines():
    fc, mlp = FCEquilibrium(784, 200, 10), MLP(784, 200, 10)
    assert count_parameters(fc) == 784 * 200 + 200 + 200 * 200 + 200 * 10 + 10 == 199_010
    assert abs(count_parameters(mlp) - count_parameters(fc)) / count_parameters(fc) < 0.01
    conv, cnn = ConvEquilibrium(1, 48, 10, 28), CNN(1, 48, 10, 28)
    assert abs(count_parameters(cnn) - count_parameters(conv)) / count_parameters(conv) < 0.01


def _tight(backward):
    return dict(solver=inn.FixedPointIteration(max_iter=500, tol=1e-13), backward=backward)


@pytest.mark.parametrize("model_cls, kwargs", [(FCEquilibrium, dict(in_features=36, width=12, num_classes=3)),
                                               (ConvEquilibrium, dict(channels=4, num_classes=3, image_size=8))])
def test_gradients_match_the_exact_implicit_gradient(model_cls, kwargs, device):
    """AID-GMRES and full ITD agree with the dense implicit gradient (``Exact``) to 1e-8."""
    torch.manual_seed(0)
    x = (torch.randn(3, 1, 6, 6) if model_cls is FCEquilibrium else torch.randn(3, 1, 8, 8)).to(device)
    grads = {}
    modes = [("exact", inn.AID(linear.Exact())), ("gmres", inn.AID(linear.GMRES(max_iter=200, tol=1e-14))),
             ("itd", inn.ITD())]
    for name, backward in modes:
        torch.manual_seed(1)
        model = model_cls(**kwargs, contraction=0.7, **_tight(backward)).double().eval().to(device)
        model.zero_grad()
        model(x.double()).pow(2).sum().backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for name in ("gmres", "itd"):
        err = (grads[name] - grads["exact"]).norm() / grads["exact"].norm()
        assert err <= 1e-8, (name, float(err))


def test_conv_model_respects_its_contraction_after_training_steps(device):
    torch.manual_seed(0)
    model = ConvEquilibrium(channels=6, image_size=12, contraction=0.8,
                            solver=inn.FixedPointIteration(max_iter=15, tol=0.0), backward=inn.ITD())
    model = model.double().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 1, 12, 12, dtype=torch.float64).to(device), torch.randint(0, 10, (8,)).to(device)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # the weight the next step will use, estimated by the default power iteration (to tol 1e-6)
    assert model.lipschitz_bound() <= 0.8 * (1 + 1e-6)


def test_projection_for_unconstrained_models(device):
    torch.manual_seed(0)
    fc = FCEquilibrium(16, 8, 3, contraction=None).to(device)
    with torch.no_grad():
        fc.contraction_weight.mul_(10)
    fc.project_(0.6)
    assert fc.lipschitz_bound() == pytest.approx(0.6, rel=1e-6)
    conv = ConvEquilibrium(channels=4, image_size=8, contraction=None).double().to(device)
    with torch.no_grad():
        conv.contraction_weight.mul_(10)
    conv.project_(0.6)
    assert conv.lipschitz_bound() <= 0.6 * (1 + 1e-5)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="multiple of 4"):
        ConvEquilibrium(image_size=30)
    with pytest.raises(ValueError, match="activation"):
        ConvEquilibrium(activation="gelu")
    with pytest.raises(ValueError, match="multiple of 4"):
        CNN(image_size=30)
