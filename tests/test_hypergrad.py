"""Hypergradient methods against closed forms, dense references and each other (float64).

Ridge: n_tr = n_val = 500, p = 100, λ = 0.1 per feature, inner map the gradient step with
step 1/L (Grazzi et al. 2020, section 5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import implicitnets as inn
from implicitnets import hypergrad as hg
from implicitnets import linear

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


class Ridge:
    def __init__(self, n: int = 500, p: int = 100, lam: float = 0.1, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(p, generator=g, dtype=torch.float64)
        self.X = torch.randn(n, p, generator=g, dtype=torch.float64)
        self.y = self.X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        self.Xv = torch.randn(n, p, generator=g, dtype=torch.float64)
        self.yv = self.Xv @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        self.lam = torch.full((p,), lam, dtype=torch.float64)
        self.L = hg.ridge_lipschitz(self.X, self.lam)
        X, y, Xv, yv = self.X, self.y, self.Xv, self.yv
        self.phi = hg.GradientStep(lambda w, hp: hg.ridge_inner_loss(X, y, w, hp[0]), 1.0 / self.L)
        self.E = lambda w, hp: hg.ridge_outer_loss(Xv, yv, w)
        self.w_star = hg.ridge_solution(X, y, self.lam)
        self.g_true = hg.ridge_hypergradient(X, y, Xv, yv, self.lam)
        self.w0 = torch.zeros(p, dtype=torch.float64)

    def rel(self, grads: tuple[torch.Tensor, ...]) -> float:
        return float((grads[0] - self.g_true).norm() / self.g_true.norm())


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


class Logistic:
    """Binary logistic regression, one L2 weight per feature (the hypertorch example, small)."""

    def __init__(self, n: int = 120, d: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w_o = torch.randn(d, generator=g, dtype=torch.float64)
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = ((X @ w_o + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).double()
        self.Xt, self.yt, self.Xv, self.yv = X[: n // 2], y[: n // 2], X[n // 2 :], y[n // 2 :]
        self.lam = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
        self.w0 = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)

    def inner(self, w: torch.Tensor, hp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.Xt @ w, self.yt) + 0.5 * (hp[0] * w * w).sum()

    def outer(self, w: torch.Tensor, hp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.Xv @ w, self.yv)


@pytest.fixture(scope="module")
def logistic() -> Logistic:
    return Logistic()


# ----------------------------------------------------------------- exact references


def test_closed_form_ridge_matches_dense_reference(ridge: Ridge) -> None:
    (dense,) = hg.dense_hypergradient(ridge.phi, ridge.E, ridge.w_star, (ridge.lam,))
    assert torch.allclose(dense, ridge.g_true, rtol=1e-10, atol=0)
    # and the fixed point is the ridge solution
    assert float((ridge.phi(ridge.w_star, (ridge.lam,)) - ridge.w_star).norm()) < 1e-13


def test_closed_form_ridge_matches_finite_differences() -> None:
    r = Ridge(n=40, p=4, lam=0.3, seed=3)
    f = lambda lam: hg.ridge_outer_loss(r.Xv, r.yv, hg.ridge_solution(r.X, r.y, lam))  # noqa: E731
    h = 1e-3
    fd = torch.empty(4)
    for i in range(4):
        e = torch.zeros(4)
        e[i] = h
        fd[i] = (8 * (f(r.lam + e) - f(r.lam - e)) - (f(r.lam + 2 * e) - f(r.lam - 2 * e))) / (12 * h)
    assert torch.allclose(fd, r.g_true, rtol=1e-9, atol=0)


# ----------------------------------------------------------------- AID, exact inner solution


@pytest.mark.parametrize(
    "solver",
    [
        linear.CG(max_iter=400, tol=1e-13),
        linear.GMRES(max_iter=400, tol=1e-13),
        linear.NormalCG(max_iter=400, tol=1e-13),
        linear.Neumann(max_iter=400, tol=1e-13),
        linear.Exact(),
    ],
    ids=repr,
)
def test_aid_at_exact_w_converges_to_exact(ridge: Ridge, solver) -> None:
    grads = hg.aid(ridge.phi, ridge.E, ridge.w_star, (ridge.lam,), solver)
    assert ridge.rel(grads) < 1e-10


def test_aid_cg_reaches_1e8_at_k20_and_beats_fp_for_k_ge_5(ridge: Ridge) -> None:
    errors = {}
    for k in range(1, 41):
        cg = ridge.rel(hg.aid(ridge.phi, ridge.E, ridge.w_star, (ridge.lam,), linear.CG(max_iter=k, tol=0.0)))
        fp = ridge.rel(hg.aid(ridge.phi, ridge.E, ridge.w_star, (ridge.lam,), linear.Neumann(max_iter=k, tol=0.0)))
        errors[k] = (cg, fp)
    assert errors[20][0] <= 1e-8
    for k in range(5, 41):
        assert errors[k][0] < errors[k][1], (k, errors[k])


def test_all_methods_converge_linearly_in_t_equals_k(ridge: Ridge) -> None:
    ts = [20, 40, 60, 80]
    curves: dict[str, list[float]] = {"ITD": [], "FP": [], "CG": [], "GMRES": []}
    for t in ts:
        w_t = hg.iterate(ridge.phi, ridge.w0, (ridge.lam,), t)
        curves["ITD"].append(ridge.rel(hg.reverse_itd(ridge.phi, ridge.E, ridge.w0, (ridge.lam,), t)))
        for name, cls in (("FP", linear.Neumann), ("CG", linear.CG), ("GMRES", linear.GMRES)):
            curves[name].append(ridge.rel(hg.aid(ridge.phi, ridge.E, w_t, (ridge.lam,), cls(max_iter=t, tol=0.0))))
    for name, errs in curves.items():
        # geometric decay: every +20 steps divides the error by >= 5 (a sublinear rate would not)
        ratios = [b / a for a, b in zip(errs, errs[1:])]
        assert all(r < 0.2 for r in ratios), (name, errs)
        assert errs[-1] < 1e-6, (name, errs)


# ----------------------------------------------------------------- ITD: forward == reverse, truncation == AID-FP


def test_forward_itd_equals_reverse_itd_ridge(ridge: Ridge) -> None:
    fwd = hg.forward_itd(ridge.phi, ridge.E, ridge.w0, (ridge.lam,), 30)
    rev = hg.reverse_itd(ridge.phi, ridge.E, ridge.w0, (ridge.lam,), 30)
    assert float((fwd[0] - rev[0]).norm() / rev[0].norm()) < 1e-10


@pytest.mark.parametrize("vectorize", [True, False])
def test_forward_itd_equals_reverse_itd_heavy_ball_with_lr_and_momentum(logistic: Logistic, vectorize: bool) -> None:
    # hyperparameters: per-feature L2 weights, log learning rate, logit momentum
    opt = hg.HeavyBall(lr=lambda hp: hp[1].exp(), momentum=lambda hp: torch.sigmoid(hp[2]))
    phi, E = opt.map(logistic.inner), opt.outer(logistic.outer)
    hp = (logistic.lam, torch.tensor(-1.0), torch.tensor(0.3))
    state0 = opt.init(logistic.w0)
    fwd = hg.ForwardITD(15, vectorize=vectorize)(phi, E, state0, hp)
    rev = hg.ReverseITD(15)(phi, E, state0, hp)
    for a, b in zip(fwd, rev):
        assert a.shape == b.shape
        assert float((a - b).norm()) <= 1e-10 * float(b.norm())


@pytest.mark.parametrize("K", [1, 5, 20])
def test_truncated_reverse_itd_from_fixed_point_equals_aid_fp(ridge: Ridge, K: int) -> None:
    itd = hg.reverse_itd(ridge.phi, ridge.E, ridge.w_star, (ridge.lam,), steps=50, truncate=K)
    fp = hg.aid(ridge.phi, ridge.E, ridge.w_star, (ridge.lam,), linear.Neumann(max_iter=K, tol=0.0))
    assert float((itd[0] - fp[0]).norm() / fp[0].norm()) < 1e-10


def test_truncated_reverse_itd_equals_aid_fp_logistic(logistic: Logistic) -> None:
    phi = hg.GradientStep(logistic.inner, 1.0)
    w_star = hg.iterate(phi, logistic.w0, (logistic.lam,), 300)
    assert float((phi(w_star, (logistic.lam,)) - w_star).norm()) < 1e-14
    for K in (1, 3, 10):
        itd = hg.reverse_itd(phi, logistic.outer, w_star, (logistic.lam,), steps=40, truncate=K)
        fp = hg.aid(phi, logistic.outer, w_star, (logistic.lam,), linear.Neumann(max_iter=K, tol=0.0))
        assert float((itd[0] - fp[0]).norm() / fp[0].norm()) < 1e-10


# ----------------------------------------------------------------- non-symmetric maps, API behaviour


@pytest.mark.parametrize(
    "solver", [linear.GMRES(max_iter=60, tol=1e-13), linear.NormalCG(max_iter=200, tol=1e-13)], ids=repr
)
def test_aid_on_heavy_ball_state_matches_dense(logistic: Logistic, solver) -> None:
    """Heavy-ball's state map has a non-symmetric Jacobian: GMRES / NormalCG, not CG."""
    opt = hg.HeavyBall(lr=0.5, momentum=0.5)
    phi_pair = opt.map(logistic.inner)
    d = logistic.w0.numel()

    def phi(z: torch.Tensor, hp: tuple[torch.Tensor, ...]) -> torch.Tensor:  # stacked (w, w_prev)
        return torch.cat(phi_pair((z[:d], z[d:]), hp))

    E = lambda z, hp: logistic.outer(z[:d], hp)  # noqa: E731
    z_star = hg.iterate(phi, logistic.w0.repeat(2), (logistic.lam,), 400)
    (dense,) = hg.dense_hypergradient(phi, E, z_star, (logistic.lam,))
    (got,) = hg.AID(solver)(phi, E, z_star, (logistic.lam,))
    assert float((got - dense).norm() / dense.norm()) < 1e-9


def test_no_grad_mutation_and_inputs_untouched(ridge: Ridge) -> None:
    lam = ridge.lam.clone().requires_grad_()
    before = lam.detach().clone()
    for method, w in (
        (hg.ReverseITD(5), ridge.w0),
        (hg.ForwardITD(2), ridge.w0),
        (hg.AID(linear.CG(max_iter=5, tol=0.0)), ridge.w_star),
    ):
        grads = method(ridge.phi, ridge.E, w, lam)
        assert isinstance(grads, tuple) and grads[0].shape == lam.shape and not grads[0].requires_grad
    assert lam.grad is None and torch.equal(lam.detach(), before)


def test_unused_hyperparameter_gets_zero_gradient(ridge: Ridge) -> None:
    unused = torch.ones(3)
    methods = ((hg.ReverseITD(3), ridge.w0), (hg.ForwardITD(3), ridge.w0),
               (hg.AID(linear.CG(max_iter=3, tol=0.0)), ridge.w_star))
    for method, w in methods:
        grads = method(ridge.phi, ridge.E, w, (ridge.lam, unused))
        assert torch.equal(grads[1], torch.zeros(3))


def test_aid_reports_non_convergence(ridge: Ridge) -> None:
    from implicitnets.errors import ConvergenceError, ConvergenceWarning

    solver = linear.Neumann(max_iter=2, tol=1e-12)
    with pytest.warns(ConvergenceWarning):
        hg.AID(solver)(ridge.phi, ridge.E, ridge.w_star, ridge.lam)
    with pytest.raises(ConvergenceError):
        hg.AID(solver, on_failure=inn.Raise())(ridge.phi, ridge.E, ridge.w_star, ridge.lam)


def test_aid_warm_start_returns_adjoint(ridge: Ridge) -> None:
    exact = hg.AID(linear.CG(max_iter=200, tol=1e-13)).solve(ridge.phi, ridge.E, ridge.w_star, ridge.lam)
    warm = hg.AID(linear.CG(max_iter=1, tol=0.0)).solve(ridge.phi, ridge.E, ridge.w_star, ridge.lam, v0=exact.v)
    assert ridge.rel(warm.grads) < 1e-10


@pytest.mark.parametrize(
    "build",
    [
        lambda: hg.ReverseITD(-1),
        lambda: hg.ReverseITD(10, truncate=0),
        lambda: hg.ReverseITD(1.5),
        lambda: hg.ForwardITD(True),
        lambda: hg.AID("cg"),
        lambda: hg.AID(linear.CG(), on_failure="raise"),
        lambda: hg.RTHO(10, hyper_lr=0.0),
        lambda: hg.RTHO(10, hyper_lr=0.1, period=0),
        lambda: hg.GradientStep(lambda w, hp: w.sum(), -0.1),
        lambda: hg.GradientDescent(lr=0),
        lambda: hg.HeavyBall(lr=0.1, momentum=1.0),
        lambda: hg.SID(-1, 10),
        lambda: hg.SID(10, 10, inner_step_size=0.5),
        lambda: hg.DecayingStep(initial=2.0),
        lambda: hg.PowerSchedule(power=1.0),
        lambda: hg.GeometricSchedule(rate=1.0),
        lambda: hg.HOAG(10, lr=0.1, linear_solver="cg"),
        lambda: hg.HOAG(10, lr=-1.0, linear_solver=linear.CG()),
    ],
)
def test_bad_options_raise_value_error(build) -> None:
    with pytest.raises(ValueError):
        build()
