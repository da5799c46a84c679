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


def steps(t: int) -> inn.FixedPointIteration:
    """Exactly t steps of the inner map."""
    return inn.FixedPointIteration(max_iter=t, tol=0.0)


def aid(problem: hg.Bilevel, hparams, w, solver, t: int = 1) -> tuple[torch.Tensor, ...]:
    """AID with ``solver`` at w_t, t inner steps from w (t = 1 from a fixed point: AID at w*)."""
    return hg.Backprop(steps(t), inn.AID(solver)).hypergradient(problem, hparams, w).grads


def reverse_itd(problem: hg.Bilevel, hparams, w0, t: int, truncate: int | None = None) -> tuple[torch.Tensor, ...]:
    return hg.Backprop(steps(t), inn.ITD(truncate)).hypergradient(problem, hparams, w0).grads


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
        self.phi = inn.maps.GradientStep(lambda w, hp: hg.ridge_inner_loss(X, y, w, hp[0]), 1.0 / self.L)
        self.E = lambda w, hp: hg.ridge_outer_loss(Xv, yv, w)
        self.problem = hg.Bilevel(self.phi, self.E)
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
    (dense,) = hg.dense_hypergradient(ridge.problem, (ridge.lam,), ridge.w_star)
    assert torch.allclose(dense, ridge.g_true, rtol=1e-10, atol=0)
    # and the fixed point is the ridge solution
    assert float((ridge.phi(ridge.w_star, (ridge.lam,)) - ridge.w_star).norm()) < 1e-13


def test_closed_form_ridge_matches_finite_differences() -> None:
    r = Ridge(n=40, p=4, lam=0.3, seed=3)
    f = lambda lam: hg.ridge_outer_loss(r.Xv, r.yv, hg.ridge_solution(r.X, r.y, lam))
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
    grads = aid(ridge.problem, (ridge.lam,), ridge.w_star, solver)
    assert ridge.rel(grads) < 1e-10


def test_aid_cg_reaches_1e8_at_k20_and_beats_fp_for_k_ge_5(ridge: Ridge) -> None:
    errors = {}
    for k in range(1, 41):
        cg = ridge.rel(aid(ridge.problem, (ridge.lam,), ridge.w_star, linear.CG(max_iter=k, tol=0.0)))
        fp = ridge.rel(aid(ridge.problem, (ridge.lam,), ridge.w_star, linear.Neumann(max_iter=k, tol=0.0)))
        errors[k] = (cg, fp)
    assert errors[20][0] <= 1e-8
    for k in range(5, 41):
        assert errors[k][0] < errors[k][1], (k, errors[k])


def test_all_methods_converge_linearly_in_t_equals_k(ridge: Ridge) -> None:
    ts = [20, 40, 60, 80]
    curves: dict[str, list[float]] = {"ITD": [], "FP": [], "CG": [], "GMRES": []}
    for t in ts:
        curves["ITD"].append(ridge.rel(reverse_itd(ridge.problem, (ridge.lam,), ridge.w0, t)))
        for name, cls in (("FP", linear.Neumann), ("CG", linear.CG), ("GMRES", linear.GMRES)):
            curves[name].append(ridge.rel(aid(ridge.problem, (ridge.lam,), ridge.w0, cls(max_iter=t, tol=0.0), t)))
    for name, errs in curves.items():
        # geometric decay: every +20 steps divides the error by >= 5 (a sublinear rate would not)
        ratios = [b / a for a, b in zip(errs, errs[1:])]
        assert all(r < 0.2 for r in ratios), (name, errs)
        assert errs[-1] < 1e-6, (name, errs)


# ----------------------------------------------------------------- ITD: forward == reverse, truncation == AID-FP


def test_forward_itd_equals_reverse_itd_ridge(ridge: Ridge) -> None:
    fwd = hg.ForwardITD(30).hypergradient(ridge.problem, (ridge.lam,), ridge.w0).grads
    rev = reverse_itd(ridge.problem, (ridge.lam,), ridge.w0, 30)
    assert float((fwd[0] - rev[0]).norm() / rev[0].norm()) < 1e-10


@pytest.mark.parametrize("vectorize", [True, False])
def test_forward_itd_equals_reverse_itd_heavy_ball_with_lr_and_momentum(logistic: Logistic, vectorize: bool) -> None:
    # hyperparameters: per-feature L2 weights, log learning rate, logit momentum
    opt = hg.HeavyBall(lr=lambda hp: hp[1].exp(), momentum=lambda hp: torch.sigmoid(hp[2]))
    problem = hg.Bilevel(opt.map(logistic.inner), opt.outer(logistic.outer))
    hp = (logistic.lam, torch.tensor(-1.0), torch.tensor(0.3))
    state0 = opt.init(logistic.w0)
    fwd = hg.ForwardITD(15, vectorize=vectorize).hypergradient(problem, hp, state0).grads
    rev = reverse_itd(problem, hp, state0, 15)
    for a, b in zip(fwd, rev):
        assert a.shape == b.shape
        assert float((a - b).norm()) <= 1e-10 * float(b.norm())


@pytest.mark.parametrize("K", [1, 5, 20])
def test_truncated_reverse_itd_from_fixed_point_equals_aid_fp(ridge: Ridge, K: int) -> None:
    itd = reverse_itd(ridge.problem, (ridge.lam,), ridge.w_star, 50, truncate=K)
    fp = aid(ridge.problem, (ridge.lam,), ridge.w_star, linear.Neumann(max_iter=K, tol=0.0))
    assert float((itd[0] - fp[0]).norm() / fp[0].norm()) < 1e-10


def test_truncated_reverse_itd_equals_aid_fp_logistic(logistic: Logistic) -> None:
    phi = inn.maps.GradientStep(logistic.inner, 1.0)
    problem = hg.Bilevel(phi, logistic.outer)
    w_star, _ = steps(300).solve(lambda w: phi(w, (logistic.lam,)), logistic.w0)
    assert float((phi(w_star, (logistic.lam,)) - w_star).norm()) < 1e-14
    for K in (1, 3, 10):
        itd = reverse_itd(problem, (logistic.lam,), w_star, 40, truncate=K)
        fp = aid(problem, (logistic.lam,), w_star, linear.Neumann(max_iter=K, tol=0.0))
        assert float((itd[0] - fp[0]).norm() / fp[0].norm()) < 1e-10


# ----------------------------------------------------------------- tuple states, API behaviour


@pytest.mark.parametrize(
    "solver", [linear.GMRES(max_iter=60, tol=1e-13), linear.NormalCG(max_iter=200, tol=1e-13)], ids=repr
)
def test_aid_on_heavy_ball_tuple_state_matches_dense(logistic: Logistic, solver) -> None:
    """Heavy-ball's state is the tuple (w, w_prev) and its Jacobian is not symmetric:
    AID with GMRES / NormalCG on the tuple state, against the dense implicit gradient."""
    opt = hg.HeavyBall(lr=0.5, momentum=0.5)
    problem = hg.Bilevel(opt.map(logistic.inner), opt.outer(logistic.outer))
    z_star, _ = steps(400).solve(lambda z: problem.inner(z, (logistic.lam,)), opt.init(logistic.w0))
    assert isinstance(z_star, tuple) and len(z_star) == 2
    (dense,) = hg.dense_hypergradient(problem, (logistic.lam,), z_star)
    (got,) = aid(problem, (logistic.lam,), z_star, solver)
    assert float((got - dense).norm() / dense.norm()) < 1e-9
    # ITD far enough through the same tuple-state iteration agrees with both
    (itd,) = reverse_itd(problem, (logistic.lam,), opt.init(logistic.w0), 400)
    assert float((itd - dense).norm() / dense.norm()) < 1e-9


def test_every_method_has_one_verb_and_one_result_type(ridge: Ridge) -> None:
    methods = [
        hg.Backprop(steps(5), inn.ITD()),
        hg.Backprop(steps(5), inn.AID(linear.CG(max_iter=5, tol=0.0))),
        hg.Backprop(steps(5), inn.JacobianFree()),
        hg.ForwardITD(5),
        hg.RTHO(5),
        hg.HOAG(linear.CG(max_iter=5)),
    ]
    for method in methods:
        assert isinstance(method, hg.HypergradientMethod)
        result = method.hypergradient(ridge.problem, ridge.lam, ridge.w0)
        assert isinstance(result, hg.Hypergradient) and result.grads[0].shape == ridge.lam.shape
        again = method.hypergradient(ridge.problem, ridge.lam, result)  # warm start from the result
        assert isinstance(again, hg.Hypergradient)


def test_no_grad_mutation_and_inputs_untouched(ridge: Ridge) -> None:
    lam = ridge.lam.clone().requires_grad_()
    before = lam.detach().clone()
    for method, w in (
        (hg.Backprop(steps(5), inn.ITD()), ridge.w0),
        (hg.ForwardITD(2), ridge.w0),
        (hg.Backprop(steps(1), inn.AID(linear.CG(max_iter=5, tol=0.0))), ridge.w_star),
    ):
        grads = method.hypergradient(ridge.problem, lam, w).grads
        assert isinstance(grads, tuple) and grads[0].shape == lam.shape and not grads[0].requires_grad
    assert lam.grad is None and torch.equal(lam.detach(), before)


def test_unused_hyperparameter_gets_zero_gradient(ridge: Ridge) -> None:
    unused = torch.ones(3)
    methods = ((hg.Backprop(steps(3), inn.ITD()), ridge.w0), (hg.ForwardITD(3), ridge.w0),
               (hg.Backprop(steps(1), inn.AID(linear.CG(max_iter=3, tol=0.0))), ridge.w_star))
    for method, w in methods:
        grads = method.hypergradient(ridge.problem, (ridge.lam, unused), w).grads
        assert torch.equal(grads[1], torch.zeros(3))


def test_aid_reports_non_convergence(ridge: Ridge) -> None:
    solver = linear.Neumann(max_iter=2, tol=1e-12)
    with pytest.warns(inn.ConvergenceWarning):
        result = aid(ridge.problem, ridge.lam, ridge.w_star, solver)
    assert torch.isfinite(result[0]).all()
    method = hg.Backprop(steps(1), inn.AID(solver, on_failure=inn.Raise()))
    with pytest.raises(inn.ConvergenceError):
        method.hypergradient(ridge.problem, ridge.lam, ridge.w_star)


def test_aid_warm_start_returns_and_reuses_the_adjoint(ridge: Ridge) -> None:
    exact = hg.Backprop(steps(1), inn.AID(linear.CG(max_iter=200, tol=1e-13))).hypergradient(
        ridge.problem, ridge.lam, ridge.w_star)
    assert exact.v is not None and exact.stats.backward.converged
    one_step = inn.AID(linear.CG(max_iter=1, tol=0.0), warm_start=True)
    warm = hg.Backprop(steps(1), one_step).hypergradient(ridge.problem, ridge.lam, exact)
    assert ridge.rel(warm.grads) < 1e-10
    cold = hg.Backprop(steps(1), one_step).hypergradient(ridge.problem, ridge.lam, ridge.w_star)
    assert ridge.rel(cold.grads) > 1e-3  # one CG step from zero is far off: the warm start did the work


@pytest.mark.parametrize(
    "build",
    [
        lambda: hg.Backprop(inn.ITD(), inn.FixedPointIteration()),
        lambda: hg.Backprop(steps(3), linear.CG()),
        lambda: hg.ForwardITD(0),
        lambda: hg.ForwardITD(1.5),
        lambda: hg.ForwardITD(3, vectorize=1),
        lambda: hg.RTHO(0),
        lambda: hg.Bilevel("phi", lambda w, hp: w.sum()),
        lambda: hg.Bilevel(lambda w, hp: w, None),
        lambda: inn.maps.GradientStep(lambda w, hp: w.sum(), -0.1),
        lambda: hg.GradientDescent(lr=0),
        lambda: hg.HeavyBall(lr=0.1, momentum=1.0),
        lambda: hg.SID(-1, 10),
        lambda: hg.SID(10, 10, inner_step_size=0.5),
        lambda: hg.DecayingStep(initial=2.0),
        lambda: hg.PowerSchedule(power=1.0),
        lambda: hg.GeometricSchedule(rate=1.0),
        lambda: hg.HOAG("cg"),
        lambda: hg.HOAG(linear.CG(), max_inner=0),
    ],
)
def test_bad_options_raise_value_error(build) -> None:
    with pytest.raises(ValueError):
        build()


def test_bad_start_and_outer_loss_raise_value_error(ridge: Ridge) -> None:
    method = hg.Backprop(steps(3), inn.ITD())
    with pytest.raises(ValueError, match="start must be"):
        method.hypergradient(ridge.problem, ridge.lam, "w0")
    vector_loss = hg.Bilevel(ridge.phi, lambda w, hp: w)
    with pytest.raises(ValueError, match="scalar"):
        method.hypergradient(vector_loss, ridge.lam, ridge.w0)
    with pytest.raises(ValueError, match="sample"):
        hg.SID(2, 2).hypergradient(ridge.problem, ridge.lam, ridge.w0)
