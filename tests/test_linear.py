"""Linear solvers for ``A x = b`` against ``torch.linalg.solve`` (float64)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from implicitnets import FunctionOperator, LinearOperator
from implicitnets.linear import CG, GMRES, Exact, LinearInfo, Neumann, NonSymmetricWarning, NormalCG

DTYPE = torch.float64
N = 12


def _scaled(M: torch.Tensor, norm: float) -> torch.Tensor:
    return M * (norm / torch.linalg.matrix_norm(M, ord=2))


# The matrices and right-hand sides are drawn on the CPU (the same numbers on every device),
# then moved to the test device.
def _spd(device: torch.device, n: int = N, seed: int = 0, m_norm: float = 0.5) -> torch.Tensor:
    """``A = I − M`` with ``M`` symmetric, ``‖M‖ = m_norm`` (SPD, Neumann-convergent)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DTYPE)
    return (torch.eye(n, dtype=DTYPE) - _scaled(M + M.T, m_norm)).to(device)


def _nonsym(device: torch.device, n: int = N, seed: int = 1, m_norm: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.eye(n, dtype=DTYPE) - _scaled(torch.randn(n, n, generator=g, dtype=DTYPE), m_norm)).to(device)


def _rhs(device: torch.device, shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).to(device)


class Counted(LinearOperator):
    """The dense ``A`` on tensors of any shape, counting ``mv`` and ``rmv`` calls."""

    def __init__(self, A: torch.Tensor):
        self.A, self.calls, self.rcalls = A, 0, 0

    @property
    def like(self) -> torch.Tensor:
        return self.A[0]

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (self.A @ x.reshape(-1)).reshape(x.shape)

    def rmv(self, y: torch.Tensor) -> torch.Tensor:
        self.rcalls += 1
        return (self.A.T @ y.reshape(-1)).reshape(y.shape)


def _solve(solver, A: torch.Tensor, b: torch.Tensor, x0=None):
    return solver.solve(Counted(A), b, x0)


ALL = [Neumann(max_iter=200), CG(), NormalCG(max_iter=200), GMRES(), Exact()]
GENERAL = [Neumann(max_iter=400), NormalCG(max_iter=400), GMRES(), Exact()]
ITERATIVE = [Neumann(max_iter=200), CG(), NormalCG(max_iter=200), GMRES()]


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


@pytest.mark.parametrize("solver", ALL, ids=repr)
def test_spd_matches_dense_solve(solver, device):
    A, b = _spd(device), _rhs(device, (N,))
    x, info = _solve(solver, A, b)
    assert isinstance(info, LinearInfo) and info.converged
    assert info.residual <= 1e-10
    assert _rel_err(x, torch.linalg.solve(A, b)) < 1e-9
    assert x.dtype == DTYPE and x.shape == b.shape


@pytest.mark.parametrize("solver", GENERAL, ids=repr)
def test_nonsymmetric_matches_dense_solve(solver, device):
    A, b = _nonsym(device), _rhs(device, (N,))
    x, info = _solve(solver, A, b)
    assert info.converged and info.residual <= 1e-10
    assert _rel_err(x, torch.linalg.solve(A, b)) < 1e-9


@pytest.mark.parametrize("solver", ALL, ids=repr)
def test_tensor_shaped_b(solver, device):
    shape = (4, 3, 5)
    n = math.prod(shape)
    A, b = _spd(device, n, seed=3), _rhs(device, shape)
    x, info = _solve(solver, A, b)
    assert info.converged and x.shape == shape
    ref = torch.linalg.solve(A, b.reshape(-1)).reshape(shape)
    assert _rel_err(x, ref) < 1e-9


def test_cg_warns_on_nonsymmetric(device):
    with pytest.warns(NonSymmetricWarning):
        _solve(CG(max_iter=5), _nonsym(device), _rhs(device, (N,)))


def test_cg_no_warning_on_symmetric_or_when_disabled(device):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _solve(CG(), _spd(device), _rhs(device, (N,)))
        _solve(CG(max_iter=5, check_symmetry=False), _nonsym(device), _rhs(device, (N,)))


# Matvec calls for `max_iter` iterations from x0 = None: Neumann uses exactly max_iter;
# the others add one for the final true residual, CG two more for the symmetry probe, GMRES
# one per restart cycle (30 iterations with restart=20: two cycles).
OVERHEAD = {Neumann: 0, CG: 3, NormalCG: 1, GMRES: 2}


@pytest.mark.parametrize("cls", [Neumann, CG, NormalCG, GMRES], ids=lambda c: c.__name__)
@pytest.mark.parametrize("A_kind", ["identity", "spd"])
def test_tol_zero_runs_exactly_max_iter_without_nan(cls, A_kind, device):
    # A = I: CG/GMRES converge exactly in one step and must keep going without 0/0.
    A = torch.eye(N, dtype=DTYPE, device=device) if A_kind == "identity" else _spd(device)
    b, max_iter = _rhs(device, (N,)), 30
    op = Counted(A)
    x, info = cls(max_iter=max_iter, tol=0.0).solve(op, b)
    mv = op
    assert info.iterations == max_iter
    assert mv.calls == max_iter + OVERHEAD[cls]
    if cls is NormalCG:
        assert op.rcalls == max_iter
    assert torch.isfinite(x).all() and math.isfinite(info.residual)
    assert info.converged and info.residual < 1e-10
    assert _rel_err(x, torch.linalg.solve(A, b)) < 1e-10


def test_gmres_restart_smaller_than_n_converges(device):
    A, b = _nonsym(device, n=40, seed=5, m_norm=0.8), _rhs(device, (40,))
    x, info = _solve(GMRES(max_iter=400, restart=5), A, b)
    assert info.converged and info.residual <= 1e-10
    assert info.iterations > 5  # needed several cycles
    assert _rel_err(x, torch.linalg.solve(A, b)) < 1e-9


def test_gmres_happy_breakdown(device):
    # A has 2 distinct eigenvalues: the Krylov space is exhausted after 2 steps.
    n = 10
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(6), dtype=DTYPE))
    A = (Q @ torch.diag(torch.tensor([1.0] * 5 + [2.0] * 5, dtype=DTYPE)) @ Q.T).to(device)
    b = _rhs(device, (n,))
    x, info = _solve(GMRES(), A, b)
    assert info.converged and info.iterations == 2
    assert _rel_err(x, torch.linalg.solve(A, b)) < 1e-12


@pytest.mark.parametrize("solver", ITERATIVE, ids=repr)
def test_warm_start_reduces_iterations(solver, device):
    A, b = _spd(device), _rhs(device, (N,))
    x_ref = torch.linalg.solve(A, b)
    _, cold = _solve(solver, A, b)
    x0 = x_ref + 1e-6 * _rhs(device, (N,), seed=9)
    x, warm = _solve(solver, A, b, x0=x0)
    assert warm.converged and warm.iterations < cold.iterations
    assert _rel_err(x, x_ref) < 1e-9


def test_warm_start_at_solution_takes_no_iterations(device):
    A, b = _nonsym(device), _rhs(device, (N,))
    x0 = torch.linalg.solve(A, b)
    for solver in (Neumann(), NormalCG(), GMRES()):
        x, info = _solve(solver, A, b, x0=x0)
        assert info.iterations == 0 and info.converged
        assert torch.equal(x, x0)


@pytest.mark.parametrize("solver", [Neumann(max_iter=3), CG(max_iter=3), NormalCG(max_iter=3),
                                    GMRES(max_iter=3)], ids=repr)
def test_nonconvergence_is_reported(solver, device):
    A, b = _spd(device, n=30, seed=7, m_norm=0.9), _rhs(device, (30,))
    x, info = _solve(solver, A, b)
    assert not info.converged and info.iterations == 3
    assert 1e-10 < info.residual < 1.0
    # the returned x is the last iterate, not the zero start
    assert torch.linalg.vector_norm(x) > 0
    true_res = float(torch.linalg.vector_norm(b - A @ x) / torch.linalg.vector_norm(b))
    assert info.residual == pytest.approx(true_res, rel=1e-12)


def test_tol_zero_reports_divergence(device):
    # Neumann on ‖M‖ = 2 diverges: tol = 0 flags a residual that grew beyond ‖b‖.
    A = -torch.eye(N, dtype=DTYPE, device=device)  # I − M with M = 2 I
    x, info = _solve(Neumann(max_iter=10, tol=0.0), A, _rhs(device, (N,)))
    assert not info.converged and info.residual > 1.0


@pytest.mark.parametrize("solver", [Neumann(), CG(), NormalCG(), GMRES(), Exact()], ids=repr)
def test_nonfinite_reported_not_raised(solver, device):
    A = _spd(device)
    A[3, 4] = float("nan")
    x, info = _solve(solver, A, _rhs(device, (N,)))
    assert not info.converged and info.residual == math.inf


@pytest.mark.parametrize("solver", ALL, ids=repr)
def test_zero_rhs_returns_zeros(solver, device):
    b = torch.zeros(N, dtype=DTYPE, device=device)
    x, info = _solve(solver, _spd(device), b, x0=torch.ones(N, dtype=DTYPE, device=device))
    assert torch.equal(x, b) and info == LinearInfo(0, 0.0, True)


def test_fixed_point_error_decays_geometrically(device):
    # A = I − M with M = 0.5·Q (Q orthogonal): error after k steps is exactly 0.5^k ‖x*‖.
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(8), dtype=DTYPE))
    A, b = (torch.eye(N, dtype=DTYPE) - 0.5 * Q).to(device), _rhs(device, (N,))
    x_ref = torch.linalg.solve(A, b)
    errs = [_rel_err(_solve(Neumann(max_iter=k, tol=0.0), A, b)[0], x_ref) for k in range(1, 16)]
    ratios = torch.tensor(errs[1:]) / torch.tensor(errs[:-1])
    assert torch.allclose(ratios, torch.full_like(ratios, 0.5), rtol=1e-6, atol=0)


def test_fixed_point_is_truncated_neumann_series(device):
    A, b, K = _nonsym(device), _rhs(device, (N,)), 7
    M = torch.eye(N, dtype=DTYPE, device=device) - A
    ref = sum(torch.linalg.matrix_power(M, j) @ b for j in range(K))
    x, _ = _solve(Neumann(max_iter=K, tol=0.0), A, b)
    assert _rel_err(x, ref) < 1e-13


def test_cg_beats_fixed_point_on_spd(device):
    A, b = _spd(device, m_norm=0.9), _rhs(device, (N,))
    _, fp = _solve(Neumann(max_iter=500), A, b)
    _, cg = _solve(CG(), A, b)
    assert fp.converged and cg.converged and cg.iterations < fp.iterations


def test_normal_cg_needs_rmv(device):
    A = _spd(device)
    op = FunctionOperator(lambda x: A @ x, like=A[0])
    with pytest.raises(NotImplementedError, match="rmv"):
        NormalCG().solve(op, _rhs(device, (N,)))


def test_x0_shape_mismatch_raises(device):
    with pytest.raises(ValueError, match="x0"):
        GMRES().solve(Counted(_spd(device)), _rhs(device, (N,)), torch.zeros(N + 1, dtype=DTYPE, device=device))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Neumann(max_iter=0),
        lambda: Neumann(max_iter=2.5),
        lambda: Neumann(max_iter=True),
        lambda: CG(tol=-1.0),
        lambda: CG(tol=float("nan")),
        lambda: CG(tol=float("inf")),
        lambda: CG(check_symmetry="yes"),
        lambda: NormalCG(max_iter=-3),
        lambda: GMRES(restart=0),
        lambda: GMRES(restart=2.0),
        lambda: GMRES(tol="1e-5"),
    ],
)
def test_invalid_options_raise(make):
    with pytest.raises(ValueError):
        make()


def test_solvers_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GMRES().restart = 3  # type: ignore[misc]


def test_float32_and_global_rng_untouched(device):
    A, b = _spd(device).float(), _rhs(device, (N,)).float()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    before_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    x, info = CG(tol=1e-5).solve(Counted(A), b)
    assert torch.equal(torch.random.get_rng_state(), before)
    if before_cuda is not None:
        assert torch.equal(torch.cuda.get_rng_state(device), before_cuda)
    assert x.dtype == torch.float32 and info.converged


@pytest.mark.parametrize("tol", [1e-10, 0.0])
def test_diverging_fixed_point_runs_until_nonfinite(tol, device):
    # ‖M‖ = 1.5: the norm of r overflows (~1e154) long before its entries do; the solve must
    # not stop there with a huge finite x but go on until the iterate is non-finite.
    A = -0.5 * torch.eye(N, dtype=DTYPE, device=device)
    x, info = _solve(Neumann(max_iter=5000, tol=tol), A, _rhs(device, (N,)))
    assert not torch.isfinite(x).all()
    assert not info.converged and info.residual == math.inf
