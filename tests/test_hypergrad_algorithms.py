"""Differentiable optimisers, RTHO, SID, HOAG and the logistic HPO mechanism (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import implicitnets as inn
from implicitnets import hypergrad as hg
from implicitnets import linear

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def small_ridge(n: int = 200, p: int = 10, lam: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(p, generator=g, dtype=torch.float64)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    Xv = torch.randn(n, p, generator=g, dtype=torch.float64)
    yv = Xv @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, Xv, yv, torch.full((p,), lam, dtype=torch.float64)


def logistic_data(n: int = 80, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_o = torch.randn(d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = ((X @ w_o + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).double()
    return X[: n // 2], y[: n // 2], X[n // 2 :], y[n // 2 :]


def steps(t: int) -> inn.FixedPointIteration:
    return inn.FixedPointIteration(max_iter=t, tol=0.0)


def unroll(opt, inner, w0: torch.Tensor, hparams, t: int) -> torch.Tensor:
    """w_t after t optimiser steps with the graph to ``hparams`` kept (the core's ITD)."""
    state, _ = inn.fixed_point(opt.map(inner), tuple(hparams), solver=steps(t), backward=inn.ITD(), z0=opt.init(w0))
    return state[0] if isinstance(state, tuple) else state


def fd4(f, x: torch.Tensor, h: float = 1e-3) -> torch.Tensor:
    """Fourth-order central differences of a scalar function of a tensor."""
    out = torch.empty_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[i] = h
        e = e.reshape(x.shape)
        out.view(-1)[i] = (8 * (f(x + e) - f(x - e)) - (f(x + 2 * e) - f(x - 2 * e))) / (12 * h)
    return out


# ----------------------------------------------------------------- differentiable lr / momentum


def test_heavy_ball_lr_and_momentum_hypergradients_match_finite_differences() -> None:
    Xt, yt, Xv, yv = logistic_data()
    inner = lambda w, hp: F.binary_cross_entropy_with_logits(Xt @ w, yt) + 0.5 * (hp[0] * w * w).sum()
    outer = lambda w, hp: F.binary_cross_entropy_with_logits(Xv @ w, yv)
    opt = hg.HeavyBall(lr=lambda hp: hp[1].exp(), momentum=lambda hp: torch.sigmoid(hp[2]))
    w0 = torch.full((4,), 0.1)
    hp = (torch.full((4,), 0.3), torch.tensor(-0.5), torch.tensor(0.2))
    T = 30
    problem = hg.Bilevel(opt.map(inner), opt.outer(outer))
    grads = hg.Backprop(steps(T), inn.ITD()).hypergradient(problem, hp, opt.init(w0)).grads

    def f(*h: torch.Tensor) -> torch.Tensor:
        return outer(unroll(opt, inner, w0, h, T), h)

    for i in range(3):
        fd = fd4(lambda x, i=i: f(*(x if j == i else hp[j] for j in range(3))), hp[i])
        assert torch.allclose(grads[i], fd, rtol=1e-8, atol=0), (i, grads[i], fd)


def test_gradient_descent_lr_hypergradient_passes_gradcheck() -> None:
    Xt, yt, Xv, yv = logistic_data(seed=1)
    inner = lambda w, hp: F.binary_cross_entropy_with_logits(Xt @ w, yt) + 0.5 * (hp[0] * w * w).sum()
    opt = hg.GradientDescent(lr=lambda hp: hp[1])
    w0 = torch.zeros(4)

    def f(lam: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xv @ unroll(opt, inner, w0, (lam, lr), 15), yv)

    inputs = (torch.full((4,), 0.2, requires_grad=True), torch.tensor(0.7, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-9, rtol=1e-7)
    # and reverse_itd / forward_itd agree with autograd through unroll
    auto = torch.autograd.grad(f(*inputs), inputs)
    problem = hg.Bilevel(opt.map(inner), lambda w, hp: F.binary_cross_entropy_with_logits(Xv @ w, yv))
    for method in (hg.Backprop(steps(15), inn.ITD()), hg.ForwardITD(15)):
        for a, b in zip(method.hypergradient(problem, inputs, w0).grads, auto):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------- RTHO


def test_rtho_single_update_is_a_forward_itd_step() -> None:
    X, y, Xv, yv, lam = small_ridge()
    phi = inn.maps.GradientStep(lambda w, hp: hg.ridge_inner_loss(X, y, w, hp[0]), 1.0 / hg.ridge_lipschitz(X, lam))
    problem = hg.Bilevel(phi, lambda w, hp: hg.ridge_outer_loss(Xv, yv, w))
    w0 = torch.zeros(10)
    res = hg.optimize(hg.RTHO(period=20), problem, lam, w0, steps=1, lr=0.5)
    (g,) = hg.ForwardITD(20).hypergradient(problem, lam, w0).grads
    assert torch.allclose(res.hparams[0], lam - 0.5 * g, rtol=1e-12, atol=1e-15)
    w20, _ = steps(20).solve(lambda w: phi(w, (lam,)), w0)
    assert torch.allclose(res.last.w, w20, rtol=1e-12, atol=1e-15)


def test_rtho_continues_the_run_across_calls() -> None:
    """Two RTHO calls of 10 steps at a fixed λ are one forward-mode run of 20 steps."""
    X, y, Xv, yv, lam = small_ridge()
    phi = inn.maps.GradientStep(lambda w, hp: hg.ridge_inner_loss(X, y, w, hp[0]), 1.0 / hg.ridge_lipschitz(X, lam))
    problem = hg.Bilevel(phi, lambda w, hp: hg.ridge_outer_loss(Xv, yv, w))
    first = hg.RTHO(10).hypergradient(problem, lam, torch.zeros(10))
    second = hg.RTHO(10).hypergradient(problem, lam, first)
    (g,) = hg.ForwardITD(20).hypergradient(problem, lam, torch.zeros(10)).grads
    assert torch.allclose(second.grads[0], g, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="carry"):
        hg.RTHO(10).hypergradient(problem, (lam, lam), first)


def test_rtho_decreases_the_outer_loss() -> None:
    X, y, Xv, yv, lam = small_ridge(lam=1.0)
    phi = inn.maps.GradientStep(lambda w, hp: hg.ridge_inner_loss(X, y, w, hp[0]), 0.3)
    E = lambda w, hp: hg.ridge_outer_loss(Xv, yv, w)
    clamp = lambda hp: tuple(h.clamp_min(0.0) for h in hp)
    res = hg.optimize(hg.RTHO(period=5), hg.Bilevel(phi, E), lam, torch.zeros(10), steps=30, lr=2.0, project=clamp)
    start = float(E(hg.ridge_solution(X, y, lam), ()))
    end = float(E(hg.ridge_solution(X, y, res.hparams[0]), ()))
    assert end < 0.9 * start and bool((res.hparams[0] >= 0).all())


# ----------------------------------------------------------------- SID


def _stochastic_ridge():
    X, y, Xv, yv, lam = small_ridge()
    alpha = 1.0 / hg.ridge_lipschitz(X, lam)

    def phi(w: torch.Tensor, hp: tuple[torch.Tensor, ...], idx: torch.Tensor) -> torch.Tensor:
        Xb, yb = X[idx], y[idx]
        return w - alpha * (Xb.T @ (Xb @ w - yb) / idx.numel() + hp[0] * w)

    E = lambda w, hp: hg.ridge_outer_loss(Xv, yv, w)
    return X, y, Xv, yv, lam, phi, E


def test_sid_full_batch_unit_steps_is_aid_fp() -> None:
    X, y, Xv, yv, lam, phi, E = _stochastic_ridge()
    full = torch.arange(X.shape[0])
    res = hg.SID(25, 12).hypergradient(hg.Bilevel(phi, E, sample=lambda: full), lam, torch.zeros(10))
    det = hg.Bilevel(lambda w, hp: phi(w, hp, full), E)
    ref = hg.Backprop(steps(25), inn.AID(linear.Neumann(max_iter=12, tol=0.0))).hypergradient(det, lam, torch.zeros(10))
    assert torch.allclose(res.w, ref.w, rtol=1e-12, atol=1e-15)
    assert torch.allclose(res.grads[0], ref.grads[0], rtol=1e-10, atol=1e-15)


def test_sid_converges_toward_exact_with_decreasing_steps() -> None:
    X, y, Xv, yv, lam, phi, E = _stochastic_ridge()
    exact = hg.ridge_hypergradient(X, y, Xv, yv, lam)
    schedule = hg.DecayingStep(1.0, decay=0.2)

    def mean_error(T: int) -> float:
        errs = []
        for seed in range(2):
            gen = torch.Generator().manual_seed(100 + seed)
            sample = lambda gen=gen: torch.randint(0, X.shape[0], (10,), generator=gen)
            sid = hg.SID(T, T, schedule, schedule)
            (g,) = sid.hypergradient(hg.Bilevel(phi, E, sample), lam, torch.zeros(10)).grads
            errs.append(float((g - exact).norm() / exact.norm()))
        return sum(errs) / len(errs)

    coarse, fine = mean_error(100), mean_error(1600)
    assert fine < 0.5 * coarse and fine < 0.1, (coarse, fine)


def test_sid_warm_start_from_the_solution_stays_there() -> None:
    X, y, Xv, yv, lam, phi, E = _stochastic_ridge()
    full = torch.arange(X.shape[0])
    w_star = hg.ridge_solution(X, y, lam)
    det = hg.Bilevel(lambda w, hp: phi(w, hp, full), E)
    exact_aid = hg.Backprop(steps(1), inn.AID(linear.CG(max_iter=100, tol=1e-14))).hypergradient(det, lam, w_star)
    res = hg.SID(0, 0).hypergradient(hg.Bilevel(phi, E, lambda: full), lam, exact_aid)
    exact = hg.ridge_hypergradient(X, y, Xv, yv, lam)
    assert torch.allclose(res.grads[0], exact, rtol=1e-9, atol=0)


# ----------------------------------------------------------------- HOAG


def test_hoag_follows_exact_hypergradient_descent() -> None:
    X, y, Xv, yv, lam = small_ridge(n=100, p=5, lam=0.5, seed=2)
    L = hg.ridge_lipschitz(X, torch.full((5,), 2.0))
    phi = inn.maps.GradientStep(lambda w, hp: hg.ridge_inner_loss(X, y, w, hp[0]), 1.0 / L)
    problem = hg.Bilevel(phi, lambda w, hp: hg.ridge_outer_loss(Xv, yv, w))
    lr, outer_steps = 1.0, 10
    hoag = hg.HOAG(linear.CG(max_iter=100), tolerance=hg.GeometricSchedule(1e-10, 0.7), max_inner=20_000)
    tolerances = []
    res = hg.optimize(hoag, problem, lam, torch.zeros(5), outer_steps, lr,
                      callback=lambda k, hp, r: tolerances.append((r.carry, r.stats.residual)))
    ref = lam.clone()
    for _ in range(outer_steps):
        ref = ref - lr * hg.ridge_hypergradient(X, y, Xv, yv, ref)
    # inexact steps with summable errors stay within O(Σ ε_k) of exact hypergradient descent
    assert torch.allclose(res.hparams[0], ref, rtol=1e-8, atol=0)
    assert res.outer_losses[-1] < 0.5 * res.outer_losses[0]
    assert [k for k, _ in tolerances] == list(range(outer_steps))
    assert all(r <= 1e-10 * 0.7**k for k, r in tolerances)  # inner solve k reached ε_k
    assert all(k >= 1 for k in res.backward_iterations)
    # warm starts: the last inner solve needs fewer steps than a cold solve to the same tolerance
    eps = 1e-10 * 0.7 ** (outer_steps - 1)
    _, cold = inn.FixedPointIteration(max_iter=20_000, tol=eps).solve(lambda w: phi(w, (ref,)), torch.zeros(5))
    assert res.inner_iterations[-1] < cold.iterations, (res.inner_iterations, cold.iterations)


# ----------------------------------------------------------------- logistic HPO (the hypertorch example)


def test_logistic_hpo_halves_the_validation_loss() -> None:
    """The hypertorch example (n = 1000, d = 20, half validation, inner GD lr 0.1, T = 100,
    λ ≥ 0 by projection): Adam on the ITD hypergradient halves the validation loss."""
    g = torch.Generator().manual_seed(1)
    n, d = 1000, 20
    w_oracle = torch.randn(d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = ((X @ w_oracle + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).double()
    perm = torch.randperm(n, generator=g)
    Xv, yv, Xt, yt = X[perm[:500]], y[perm[:500]], X[perm[500:]], y[perm[500:]]
    inner = lambda w, hp: F.binary_cross_entropy_with_logits(Xt @ w, yt) + 0.5 * (hp[0] * w * w).sum()
    outer = lambda w, hp: F.binary_cross_entropy_with_logits(Xv @ w, yv)
    problem = hg.Bilevel(inn.maps.GradientStep(inner, 0.1), outer)
    itd = hg.Backprop(steps(100), inn.ITD())
    lam = torch.ones(d, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=0.1)
    w0 = torch.zeros(d)
    losses = []
    for _ in range(12):
        result = itd.hypergradient(problem, lam, w0)
        losses.append(float(outer(result.w, ())))
        (lam.grad,) = result.grads  # the test loop owns .grad, the library does not
        opt.step()
        with torch.no_grad():
            lam.clamp_(min=0.0)
    final = float(outer(itd.hypergradient(problem, lam, w0).w, ()))
    assert final <= 0.5 * losses[0], (losses[0], final)
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), losses  # monotone on this problem
