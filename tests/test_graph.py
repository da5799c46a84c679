"""GraphMap (IGNN): gradients in every backward mode against the dense implicit gradient,
the ∞-norm projection, and λ_pf against a dense eigenvalue computation (float64)."""

from __future__ import annotations

import pytest
import torch

import implicitnets as inn
from implicitnets import linear
from implicitnets.diagnostics import perron_frobenius
from implicitnets.maps import GraphMap, normalized_adjacency
from implicitnets.parametrizations import InfNormBound, inf_norm, project_inf_norm_, project_l1_ball

pytestmark = pytest.mark.usefixtures("float64")

N, P, M, B = 9, 3, 4, 2  # nodes, input features, width, feature sets on the graph
FPI = inn.FixedPointIteration(max_iter=600, tol=1e-14)
ANDERSON = inn.Anderson(max_iter=200, tol=1e-14)


def random_graph(seed: int = 0, n: int = N) -> torch.Tensor:
    """A ring (connected) plus random chords, as (2, E) edges."""
    g = torch.Generator().manual_seed(seed)
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    chords = torch.randint(0, n, (2, n), generator=g)
    chords = chords[:, chords[0] != chords[1]]
    return torch.cat([ring, chords], 1)


def make_map(kappa: float = 0.9, activation=torch.tanh, parametrize: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    A = normalized_adjacency(random_graph(seed), N)
    f = GraphMap(P, M, A, kappa=kappa, activation=activation, parametrize=parametrize)
    with torch.no_grad():  # a W on the boundary of the admissible ball: the hardest contraction
        W = torch.randn(M, M)
        target = f.parametrizations.W.original if parametrize else f.W
        target.copy_(W * (f.bound / inf_norm(W)))
    return f, A.to_dense()


def dense_step(A, activation, W, Omega, z, x):
    """The same map written densely, independent of the sparse implementation."""
    return activation(W @ z @ A + Omega @ x @ A)


def dense_reference(f: GraphMap, A: torch.Tensor, x: torch.Tensor, R: torch.Tensor, jacobian_free: bool = False):
    """Gradients of E = <R, Z*> w.r.t. (W, Ω, x) by the implicit function theorem."""
    W, Omega = f.W.detach(), f.Omega.detach()
    with torch.no_grad():
        z, stats = FPI.solve(lambda z: dense_step(A, f.activation, W, Omega, z, x), torch.zeros(B, M, N))
    assert stats.converged
    d = z.numel()
    J = torch.func.jacrev(lambda z_: dense_step(A, f.activation, W, Omega, z_, x))(z).reshape(d, d)
    v = R.reshape(-1) if jacobian_free else torch.linalg.solve((torch.eye(d) - J).T, R.reshape(-1))
    Wr, Or, xr = (t.clone().requires_grad_() for t in (W, Omega, x))
    out = (v.reshape(z.shape) * dense_step(A, f.activation, Wr, Or, z, xr)).sum()
    return torch.autograd.grad(out, (Wr, Or, xr))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


MODES = [
    inn.ITD(),
    inn.AID(linear.Neumann(max_iter=600, tol=1e-14)),
    inn.AID(linear.GMRES(max_iter=200, tol=1e-14, restart=40)),
    inn.AID(linear.NormalCG(max_iter=400, tol=1e-14)),
    inn.JacobianFree(),
]


# ITD through Anderson differentiates Anderson's iterates, not the fixed point: not a case here
CASES = [pytest.param(backward, solver, id=f"{backward!r}-{name}")
         for backward in MODES for solver, name in ((FPI, "fpi"), (ANDERSON, "anderson"))
         if not (isinstance(backward, inn.ITD) and solver is ANDERSON)]


@pytest.mark.parametrize("activation", [torch.tanh, torch.relu], ids=["tanh", "relu"])
@pytest.mark.parametrize("backward, solver", CASES)
def test_gradients_match_dense_implicit_gradient(backward, solver, activation):
    f, A = make_map(activation=activation)
    x, R = torch.randn(B, P, N), torch.randn(B, M, N)
    xr = x.clone().requires_grad_()
    z, stats = inn.fixed_point(f, xr, solver=solver, backward=backward)
    assert stats.converged and z.shape == (B, M, N)
    got = torch.autograd.grad((R * z).sum(), (f.W, f.Omega, xr))
    want = dense_reference(f, A, x, R, jacobian_free=isinstance(backward, inn.JacobianFree))
    for g, w in zip(got, want, strict=True):
        assert rel(g, w) < 1e-9


def test_truncated_itd_from_the_fixed_point_matches_the_implicit_gradient():
    # κ = 0.3: 40 differentiated steps leave an error of order 0.3⁴⁰ ≈ 1e-21
    f, A = make_map(kappa=0.3)
    x, R = torch.randn(B, P, N), torch.randn(B, M, N)
    z, _ = inn.fixed_point(f, x, solver=FPI, backward=inn.ITD(truncate=40))
    got = torch.autograd.grad((R * z).sum(), (f.W, f.Omega))
    want = dense_reference(f, A, x, R)[:2]
    for g, w in zip(got, want, strict=True):
        assert rel(g, w) < 1e-10
    # and a truncation too short to converge is measurably different (the test can fail)
    z, _ = inn.fixed_point(f, x, solver=FPI, backward=inn.ITD(truncate=2))
    assert rel(torch.autograd.grad((R * z).sum(), f.W)[0], want[0]) > 1e-4


def test_parametrized_bound_gradient_flows_to_the_original_weight():
    f, A = make_map(parametrize=True)
    original = f.parametrizations.W.original
    with torch.no_grad():
        original.mul_(3.0)  # outside the ball: the parametrization rescales it
    assert abs(float(inf_norm(f.W.detach())) - f.bound) < 1e-12
    x, R = torch.randn(B, P, N), torch.randn(B, M, N)
    z, _ = inn.fixed_point(f, x, solver=FPI, backward=inn.AID(linear.GMRES(max_iter=200, tol=1e-14)))
    got = torch.autograd.grad((R * z).sum(), original)[0]
    gW = dense_reference(f, A, x, R)[0]  # the gradient w.r.t. the effective W, chained by hand
    Wo = original.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(InfNormBound(f.bound)(Wo), Wo, gW)
    assert rel(got, want) < 1e-9


def test_the_bound_makes_picard_converge_geometrically():
    f, _ = make_map(kappa=0.9, activation=torch.relu)
    assert f.well_posedness() <= 0.9 + 1e-12
    x = torch.randn(B, P, N)
    with torch.no_grad():
        _, stats = inn.FixedPointIteration(max_iter=600, tol=1e-12, check_every=1).solve(
            lambda z: f(z, x), torch.zeros(B, M, N))
    assert stats.converged


def brute_force_l1_projection(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Bisection on the threshold θ of ``sign(v) max(|v| − θ, 0)`` (KKT conditions)."""
    if v.abs().sum() <= radius:
        return v.clone()
    lo, hi = torch.zeros(()), v.abs().max()
    for _ in range(200):
        mid = (lo + hi) / 2
        if (v.abs() - mid).clamp_min(0).sum() > radius:
            lo = mid
        else:
            hi = mid
    return torch.sign(v) * (v.abs() - (lo + hi) / 2).clamp_min(0)


def test_projection_onto_the_inf_norm_ball_is_the_euclidean_projection():
    torch.manual_seed(1)
    W = torch.randn(7, 11) * torch.tensor([0.01, 0.1, 1, 3, 10, 0.02, 5]).unsqueeze(1)  # some rows inside
    bound = 1.5
    P_ = project_inf_norm_(W.clone(), bound)
    assert float(inf_norm(P_)) <= bound * (1 + 1e-14)
    inside = W.abs().sum(1) <= bound
    assert inside.any() and (~inside).any()
    assert torch.equal(P_[inside], W[inside])  # rows inside are left alone
    for v, p in zip(W, P_, strict=True):
        assert torch.allclose(p, brute_force_l1_projection(v, bound), rtol=0, atol=1e-13)
        # optimality certificate: ⟨v − p, c − p⟩ ≤ 0 at every vertex c = ±r e_i of the ℓ1 ball,
        # hence on the whole ball (its convex hull): p is the Euclidean projection
        d = v - p
        assert float(bound * d.abs().max() - d @ p) <= 1e-12 * float(d.norm() * bound + 1)
    # a random point of the ball is never closer to W than the projection
    c = project_l1_ball(torch.randn(1000, 7, 11), bound)
    assert float(((c - W) ** 2).sum((1, 2)).min()) >= float(((P_ - W) ** 2).sum())


def test_projection_handles_ties_and_zero_rows():
    v = torch.tensor([[2.0, 2.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    p = project_l1_ball(v, 3.0)
    assert torch.allclose(p, torch.tensor([[1.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]),
                          rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="bound"):
        project_l1_ball(v, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perron_frobenius_matches_dense_eigenvalues(seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(12, 12, generator=g) * (torch.rand(12, 12, generator=g) < 0.3)
    A = A + torch.diag(torch.ones(11), 1)  # a path: irreducible with the ring edge below
    A[-1, 0] = 1.0
    exact = float(torch.linalg.eigvals(A).abs().max())
    for matrix in (A, A.to_sparse()):
        pf = perron_frobenius(matrix, tol=1e-13)
        assert pf.converged and pf.lower <= exact * (1 + 1e-12) and pf.upper >= exact * (1 - 1e-12)
        assert abs(pf.upper - exact) / exact < 1e-12


def test_perron_frobenius_on_a_bipartite_chain_and_errors():
    n = 10  # path without self-loops: bipartite, spectrum ±2cos(kπ/(n+1)); the shift handles it
    A = torch.diag(torch.ones(n - 1), 1) + torch.diag(torch.ones(n - 1), -1)
    pf = perron_frobenius(A.to_sparse(), tol=1e-13)
    assert abs(pf.upper - 2 * torch.cos(torch.tensor(torch.pi / (n + 1))).item()) < 1e-11
    assert abs(perron_frobenius(normalized_adjacency(random_graph(), N)).upper - 1.0) < 1e-9
    with pytest.raises(ValueError, match="negative"):
        perron_frobenius(-A)
    with pytest.raises(ValueError, match="square"):
        perron_frobenius(torch.ones(2, 3))


def test_graph_map_rejects_bad_input():
    f, _ = make_map()
    with pytest.raises(ValueError, match="expects x of shape"):
        f.inject(torch.zeros(P, N))
    with pytest.raises(ValueError, match="kappa"):
        GraphMap(P, M, normalized_adjacency(random_graph(), N), kappa=1.0)
    with pytest.raises(ValueError, match="square"):
        GraphMap(P, M, torch.ones(3, 4))


@pytest.mark.parametrize("build,message", [
    (lambda A: GraphMap(0, M, A), "GraphMap: in_features must be an int >= 1, got 0"),
    (lambda A: GraphMap(P, True, A), "GraphMap: width must be an int >= 1, got True"),
    (lambda A: inn.maps.TanhMap(3.0, 4), "TanhMap: in_features must be an int >= 1, got 3.0"),
    (lambda A: inn.maps.TanhMap(3, -1), "TanhMap: width must be an int >= 1, got -1"),
])
def test_map_sizes_must_be_positive_ints(build, message):
    with pytest.raises(ValueError, match=message):
        build(normalized_adjacency(random_graph(), N))
