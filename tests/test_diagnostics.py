"""Diagnostics against exact values (float64, tolerances near 1e-8)."""

from __future__ import annotations

import math

import pytest
import torch

import implicitnets as inn
from implicitnets.diagnostics import (
    detect_divergence,
    hypergradient_error,
    jacobian_frobenius_sq,
    jacobian_spectral_norm,
    jacobian_spectral_radius,
    lipschitz_bound,
)
from implicitnets.maps.jacobian import linearize

pytestmark = pytest.mark.usefixtures("float64")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batched_linear(M: torch.Tensor):
    """Φ(w, x) = M_b w_b + x_b for a batch of matrices M (batch, d, d): J is block diagonal."""
    return lambda w, x: torch.einsum("bij,bj->bi", M, w) + x


def _with_eigenvalues(eigs: list[complex], seed: int) -> torch.Tensor:
    """A real non-normal matrix S D S⁻¹ with the given eigenvalues (conjugate pairs as 2×2 blocks)."""
    blocks, i = [], 0
    while i < len(eigs):
        lam = eigs[i]
        if isinstance(lam, complex) and lam.imag != 0:
            a, b = lam.real, lam.imag
            blocks.append(torch.tensor([[a, b], [-b, a]]))
            i += 2  # the conjugate is implied
        else:
            blocks.append(torch.tensor([[float(lam.real if isinstance(lam, complex) else lam)]]))
            i += 1
    D = torch.block_diag(*blocks)
    S = torch.randn(D.shape[0], D.shape[0], generator=_gen(seed)) + 3 * torch.eye(D.shape[0])
    return S @ D @ torch.linalg.inv(S)


def test_linearization_matches_jacobian():
    W = torch.randn(5, 5, generator=_gen(1))
    f = lambda w, x: torch.tanh(w @ W.T + x)
    z, x = torch.randn(3, 5, generator=_gen(2)), torch.randn(3, 5, generator=_gen(3))
    lin = linearize(f, z, x)
    v = torch.randn(3, 5, generator=_gen(4))
    J = torch.stack([torch.func.jacrev(lambda w, b=b: f(w, x[b]))(z[b]) for b in range(3)])
    torch.testing.assert_close(lin.mv(v), torch.einsum("bij,bj->bi", J, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.rmv(v), torch.einsum("bji,bj->bi", J, v), rtol=1e-12, atol=1e-12)


def test_spectral_radius_nonsymmetric_known_eigenvalues():
    # sample 0: real dominant eigenvalue -0.95, sample 1: dominant complex pair |0.6±0.7i|,
    # sample 2: two eigenvalues of equal modulus ±0.8 (power iteration on J never converges).
    spectra = [
        [-0.95, 0.9, 0.5, 0.1, -0.3, 0.2],
        [complex(0.6, 0.7), complex(0.6, -0.7), 0.9, -0.4, 0.3, 0.0],
        [0.8, -0.8, 0.5, 0.25, -0.1, 0.05],
    ]
    M = torch.stack([_with_eigenvalues(s, seed=10 + i) for i, s in enumerate(spectra)])
    expected = torch.tensor([0.95, math.hypot(0.6, 0.7), 0.8])
    est = jacobian_spectral_radius(
        _batched_linear(M), torch.zeros(3, 6), torch.zeros(3, 6), krylov_dim=6, generator=_gen(5)
    )
    assert est.converged
    torch.testing.assert_close(est.per_sample, expected, rtol=1e-8, atol=0)
    assert est.worst == pytest.approx(0.95, rel=1e-8)
    # and it agrees with the dense eigenvalues
    torch.testing.assert_close(est.per_sample, torch.linalg.eigvals(M).abs().max(1).values, rtol=1e-8, atol=0)


def test_spectral_radius_repeated_eigenvalues_breakdown():
    # diag(0.5, 0.5, 0.5, 0.9): the Krylov space has dimension 2; Arnoldi breaks down, exactly.
    M = torch.diag(torch.tensor([0.5, 0.5, 0.5, 0.9])).expand(2, 4, 4).contiguous()
    est = jacobian_spectral_radius(_batched_linear(M), torch.zeros(2, 4), torch.zeros(2, 4), generator=_gen(6))
    assert est.converged and est.iterations == 2
    torch.testing.assert_close(est.per_sample, torch.full((2,), 0.9), rtol=1e-10, atol=0)


def test_spectral_radius_of_tanh_map_at_fixed_point():
    torch.manual_seed(0)
    f = inn.maps.TanhMap(7, 12, contraction=None).double()
    with torch.no_grad():
        f.A.weight.mul_(2.0)
    x = torch.randn(4, 7, generator=_gen(7))
    z = torch.randn(4, 12, generator=_gen(8))
    J = torch.stack([torch.func.jacrev(lambda w, b=b: f(w[None], x[b : b + 1])[0])(z[b]) for b in range(4)])
    est = jacobian_spectral_radius(f, z, x, krylov_dim=12, generator=_gen(9))
    torch.testing.assert_close(est.per_sample, torch.linalg.eigvals(J).abs().max(1).values, rtol=1e-8, atol=0)
    whole = jacobian_spectral_radius(f, z, x, krylov_dim=48, per_sample=False, generator=_gen(9))
    assert whole.per_sample.shape == (1,)
    assert whole.worst == pytest.approx(est.worst, rel=1e-8)


def test_spectral_norm_matches_matrix_norm():
    M = torch.randn(4, 8, 8, generator=_gen(11))
    est = jacobian_spectral_norm(
        _batched_linear(M), torch.zeros(4, 8), torch.zeros(4, 8), max_iter=2000, tol=1e-14, generator=_gen(12)
    )
    expected = torch.linalg.matrix_norm(M, ord=2)
    torch.testing.assert_close(est.per_sample, expected, rtol=1e-8, atol=0)
    assert est.worst == pytest.approx(float(expected.max()), rel=1e-8)
    assert est.converged


def test_spectral_norm_is_lower_bound_and_bounds_radius():
    M = torch.randn(2, 10, 10, generator=_gen(13))
    z = torch.zeros(2, 10)
    few = jacobian_spectral_norm(_batched_linear(M), z, z, max_iter=2, tol=0.0, generator=_gen(14))
    assert few.iterations == 2 and not few.converged
    assert (few.per_sample <= torch.linalg.matrix_norm(M, ord=2) * (1 + 1e-12)).all()
    rho = jacobian_spectral_radius(_batched_linear(M), z, z, krylov_dim=10, generator=_gen(15))
    assert (rho.per_sample <= torch.linalg.matrix_norm(M, ord=2) * (1 + 1e-12)).all()


def test_spectral_norm_of_tanh_map_bounded_by_lipschitz_bound():
    torch.manual_seed(1)
    f = inn.maps.TanhMap(5, 9, contraction=0.7, exact=True).double()
    x = torch.randn(6, 5, generator=_gen(16))
    z = torch.randn(6, 9, generator=_gen(17))
    est = jacobian_spectral_norm(f, z, x, max_iter=3000, tol=1e-14, generator=_gen(18))
    J = torch.stack([torch.func.jacrev(lambda w, b=b: f(w[None], x[b : b + 1])[0])(z[b]) for b in range(6)])
    torch.testing.assert_close(est.per_sample, torch.linalg.matrix_norm(J, ord=2), rtol=1e-8, atol=0)
    bound = lipschitz_bound(f)
    assert bound == pytest.approx(0.7, rel=1e-10)
    assert est.worst <= bound


def test_lipschitz_bound_expansive_and_unsupported():
    f = inn.maps.TanhMap(3, 4, contraction=None).double()
    with torch.no_grad():
        f.A.weight.copy_(torch.diag(torch.tensor([1.5, 0.2, -0.3, 1.0])))
    assert lipschitz_bound(f) == pytest.approx(1.5, rel=1e-12)
    lin = torch.nn.Linear(3, 3, bias=False).double()
    assert lipschitz_bound(lin) == pytest.approx(float(torch.linalg.matrix_norm(lin.weight.detach(), 2)), rel=1e-12)
    with pytest.raises(TypeError, match="lipschitz_bound"):
        lipschitz_bound(lambda w, x: w)


def test_hutchinson_exact_with_basis_probes():
    M = torch.randn(3, 5, 5, generator=_gen(19))
    d = 5
    probes = math.sqrt(d) * torch.eye(d)[:, None, :].expand(d, 3, d)
    est = jacobian_frobenius_sq(_batched_linear(M), torch.zeros(3, d), torch.zeros(3, d), probes=probes)
    torch.testing.assert_close(est, torch.linalg.matrix_norm(M, ord="fro") ** 2, rtol=1e-12, atol=0)
    total = jacobian_frobenius_sq(
        _batched_linear(M), torch.zeros(3, d), torch.zeros(3, d), probes=probes, per_sample=False
    )
    assert float(total) == pytest.approx(float((M**2).sum()), rel=1e-12)


def test_hutchinson_is_unbiased():
    torch.manual_seed(2)
    M = torch.randn(1, 6, 6, generator=_gen(20))
    est = jacobian_frobenius_sq(
        _batched_linear(M), torch.zeros(1, 6), torch.zeros(1, 6), n_probes=20000, generator=_gen(21)
    )
    exact = float((M**2).sum())
    # Rademacher variance is 2 Σ_{i≠j} ((MᵀM)_ij)²-ish; 20000 probes => ~1% standard error;
    # the check is 5 standard errors of the exact variance formula.
    G = M[0] @ M[0].T  # E‖Mᵀε‖² = tr(MMᵀ); Var = 2 Σ_{i≠j} G_ij²
    std = math.sqrt(2 * float((G**2).sum() - (torch.diag(G) ** 2).sum()) / 20000)
    assert abs(float(est[0]) - exact) < 5 * std


def test_hutchinson_regulariser_is_differentiable():
    torch.manual_seed(3)
    f = inn.maps.TanhMap(4, 6, contraction=None).double()
    x = torch.randn(5, 4, generator=_gen(22))
    z = torch.randn(5, 6, generator=_gen(23))
    probes = math.sqrt(6) * torch.eye(6)[:, None, :].expand(6, 5, 6)
    reg = jacobian_frobenius_sq(f, z, x, probes=probes).sum()
    grads = torch.autograd.grad(reg, [f.A.weight, f.B.weight, f.B.bias])

    def exact(A, Bw, Bb):
        s = 1 - torch.tanh(z @ A.T + x @ Bw.T + Bb) ** 2  # J_b = diag(s_b) A
        return ((s[:, :, None] * A[None]) ** 2).sum()

    ref = torch.autograd.grad(exact(f.A.weight, f.B.weight, f.B.bias), [f.A.weight, f.B.weight, f.B.bias])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert float(reg.detach()) == pytest.approx(float(exact(f.A.weight, f.B.weight, f.B.bias)), rel=1e-12)
    detached = jacobian_frobenius_sq(f, z, x, probes=probes, create_graph=False)
    assert not detached.requires_grad


def test_detect_divergence():
    assert not detect_divergence([1.0, 0.5, 0.25, 0.3, 0.1]).diverged
    stalled = detect_divergence([1.0, 0.9, 0.9, 0.95, 0.9])
    assert not stalled and stalled.max_growth == pytest.approx(0.95 / 0.9)
    grown = detect_divergence([1.0, 0.1, 0.5, 2.0, 40.0])
    assert grown.diverged and not grown.nonfinite and grown.index == 3
    assert grown.max_growth == pytest.approx(400.0)
    nan = detect_divergence(torch.tensor([1.0, 0.5, float("nan")]))
    assert nan.diverged and nan.nonfinite and nan.index == 2
    inf = detect_divergence([1.0, float("inf")])
    assert inf.nonfinite and inf.index == 1
    # patience: one spike is tolerated, two consecutive are not
    assert not detect_divergence([1.0, 0.1, 5.0, 0.1, 0.05], patience=2).diverged
    assert detect_divergence([1.0, 0.1, 5.0, 6.0, 0.05], patience=2).index == 3
    assert not detect_divergence([]).diverged
    with pytest.raises(ValueError):
        detect_divergence([1.0], growth=0.5)
    with pytest.raises(ValueError):
        detect_divergence([1.0], patience=0)


def test_hypergradient_error():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    ref = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    err = hypergradient_error(g, ref)
    assert err.absolute == pytest.approx(1.0, rel=1e-12)
    assert err.relative == pytest.approx(1.0 / math.sqrt(21.0), rel=1e-12)
    assert err.cosine == pytest.approx(17.0 / math.sqrt(14.0 * 21.0), rel=1e-12)
    assert err.finite
    none = hypergradient_error([None, torch.tensor([1.0])], [torch.tensor([2.0]), torch.tensor([1.0])])
    assert none.relative == pytest.approx(2.0 / math.sqrt(5.0), rel=1e-12)
    assert not hypergradient_error(torch.tensor([float("nan")]), torch.tensor([1.0])).finite
    with pytest.raises(ValueError):
        hypergradient_error([torch.ones(2)], [torch.ones(3)])


def test_hypergradient_error_of_truncated_aid_falls_geometrically():
    """AID-FP with k steps vs the exact implicit gradient: the error shrinks like ρ^k."""
    torch.manual_seed(4)
    f = inn.maps.TanhMap(6, 10, contraction=0.6, exact=True).double()
    x = torch.randn(8, 6, generator=_gen(24))
    solver = inn.FixedPointIteration(max_iter=200, tol=1e-14)

    def grads(backward):
        w, _ = inn.fixed_point(f, x, solver=solver, backward=backward)
        return torch.autograd.grad(w.pow(2).sum(), list(f.parameters()))

    reference = grads(inn.AID(inn.linear.Exact()))
    errors = [
        hypergradient_error(grads(inn.AID(inn.linear.Neumann(max_iter=k, tol=0.0))), reference).relative
        for k in (2, 4, 8, 16)
    ]
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.6**16 * 10
