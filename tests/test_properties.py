"""Property-based tests (hypothesis): random contraction maps against the dense implicit gradient.

A problem is ``w = tanh(A w + B x + c)`` with a random ``A`` of spectral norm ``q`` ∈ (0, 0.95),
random sizes (batch 1–3), float32 or float64, the state a tensor or a tuple of two tensors
(the blocks of ``w``).  Every forward solver with every backward mode is compared with the
dense reference in float64: ``J = ∂₁Φ(w*)`` by ``torch.func.jacrev``, ``v = (I − J)⁻ᵀ R`` by
``torch.linalg.solve``, gradients ``∂₂Φ(w*)ᵀ v`` of ``E = ⟨R, w*⟩`` for ``A``, ``B``, ``c``
and ``x``.  ``ITD(truncate=K)`` is compared with the truncated Neumann series
``Σ_{j<K} (Jᵀ)ʲ R`` it is defined to compute from a converged start, and
``JacobianFree`` with ``v = R``.  Solves stop at :func:`solve_tol`; gradients must agree to
:func:`tolerance` (float64: ``1e-10 / (1 − q)`` relative).  The profile (``tests/conftest.py``) is derandomized.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import implicitnets as inn
from implicitnets import linear


class BlockTanh(nn.Module):
    """``w = tanh(A w + B x + c)`` on a state of one block (a tensor) or two (a tuple)."""

    def __init__(self, A: Tensor, B: Tensor, c: Tensor, blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.A, self.B, self.c = nn.Parameter(A), nn.Parameter(B), nn.Parameter(c)
        self.blocks = blocks

    def join(self, w):
        return w if isinstance(w, Tensor) else torch.cat(w, dim=1)

    def split(self, w: Tensor):
        return w if len(self.blocks) == 1 else tuple(torch.split(w, list(self.blocks), dim=1))

    def forward(self, w, x: Tensor):
        return self.split(torch.tanh(self.join(w) @ self.A.T + x @ self.B.T + self.c))

    def initial_state(self, x: Tensor):
        return self.split(x.new_zeros(x.shape[0], sum(self.blocks)))


@st.composite
def problems(draw):
    """(map, x, R, q): a random q-contraction ``BlockTanh`` with an input batch and a cotangent."""
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    q = draw(st.floats(0.05, 0.95, exclude_max=True, allow_subnormal=False))
    blocks = draw(st.sampled_from([(1,), (2,), (4,), (1, 2), (3, 2)]))
    batch, n_in = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    width = sum(blocks)
    A = torch.randn(width, width, generator=gen, dtype=torch.float64)
    A = q * A / torch.linalg.matrix_norm(A, 2)
    # |A w| <= q √width <= 2.2 and |B x + c| <= 1: tanh is never saturated so deeply that float32
    # loses its slope 1 − tanh² to cancellation
    uniform = lambda *shape: 2 * torch.rand(*shape, generator=gen, dtype=torch.float64) - 1
    B = uniform(width, n_in) / (2 * n_in)
    c = uniform(width) / 2
    x = uniform(batch, n_in)
    R = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    cell = BlockTanh(A.to(dtype), B.to(dtype), c.to(dtype), blocks)
    return cell, x.to(dtype), R.to(dtype), q


def dense(cell: BlockTanh, x: Tensor, R: Tensor, v_of=None) -> list[Tensor]:
    """Float64 gradients of ``⟨R, w*⟩`` for (A, B, c, x): ``∂₂Φᵀ v`` with ``v = v_of(J, R)``
    (default: the implicit ``(I − J)⁻ᵀ R``)."""
    ref = BlockTanh(*(p.detach().double() for p in (cell.A, cell.B, cell.c)), cell.blocks)
    x = x.double()
    with torch.no_grad():
        w = ref.initial_state(x)
        for _ in range(10_000):
            new = ref(w, x)
            if torch.equal(ref.join(new), ref.join(w)):
                break
            w = new
    flat = ref.join(w)
    J = torch.func.jacrev(lambda z: ref.join(ref(ref.split(z), x)))(flat).reshape(flat.numel(), flat.numel()).detach()
    r = R.double().reshape(-1)
    if v_of is None:
        v = torch.linalg.solve((torch.eye(flat.numel(), dtype=torch.float64) - J).T, r)
    else:
        v = v_of(J, r)
    xr = x.detach().requires_grad_()
    out = (v.reshape(flat.shape) * ref.join(ref(w, xr))).sum()
    return list(torch.autograd.grad(out, [ref.A, ref.B, ref.c, xr]))


def layer_gradients(cell, x, R, solver, backward, z0=None):
    xr = x.detach().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", inn.ConvergenceWarning)
        w, stats = inn.fixed_point(cell, xr, solver=solver, backward=backward, z0=z0)
    w = cell.join(w)
    grads = torch.autograd.grad((R * w).sum(), [cell.A, cell.B, cell.c, xr])
    return list(grads), stats


def relative_error(grads: list[Tensor], reference: list[Tensor]) -> float:
    """``‖g − r‖ / ‖r‖`` over all gradients (A, B, c, x) as one vector (``‖g‖`` when ``r = 0``,
    e.g. a ReLU map with every unit off)."""
    g = torch.cat([t.double().reshape(-1) for t in grads])
    r = torch.cat([t.reshape(-1) for t in reference])
    scale = float(torch.linalg.vector_norm(r))
    return float(torch.linalg.vector_norm(g - r)) / (scale if scale > 0 else 1.0)


def solve_tol(dtype: torch.dtype, q: float) -> float:
    """The relative residual a solve stops at: 1e-13 in float64; in float32 ten epsilons times
    ``1/(1 − q)``, the conditioning of ``I − J`` (what rounding lets a solve reach)."""
    if dtype == torch.float64:
        return 1e-13
    return 10 * torch.finfo(torch.float32).eps / (1 - q)


def forward_solver(kind: str, dtype: torch.dtype, q: float, unrolled: bool = False) -> inn.ForwardSolver:
    """The solver ``kind`` stopping at :func:`solve_tol`; ``unrolled`` (fixed-point ITD in float32)
    runs a fixed ``t`` with ``qᵗ`` below float32's epsilon instead: the derivative of the
    iterates lags behind them (its error falls like ``t·qᵗ``), and float32's stop leaves it
    short of converged."""
    tol, max_iter = solve_tol(dtype, q), 5000
    if unrolled:
        tol, max_iter = 0.0, math.ceil(math.log(torch.finfo(dtype).eps) / math.log(q)) + 10
    if kind == "FixedPointIteration":
        return inn.FixedPointIteration(max_iter=max_iter, tol=tol)
    if kind == "Anderson":
        return inn.Anderson(max_iter=500, tol=tol, memory=5)
    return inn.Broyden(max_iter=500, tol=tol, memory=20)


def backward_mode(kind: str, dtype: torch.dtype, q: float) -> inn.BackwardMode:
    tol = solve_tol(dtype, q)
    return {
        "ITD": inn.ITD(),
        "AID-Neumann": inn.AID(linear.Neumann(max_iter=5000, tol=tol)),
        # CG on the normal equations: the condition number squared, (1 + q)/(1 − q) times
        "AID-NormalCG": inn.AID(linear.NormalCG(max_iter=500, tol=tol * (1 + q) / (1 - q))),
        "AID-GMRES": inn.AID(linear.GMRES(max_iter=300, tol=tol, restart=30)),
        "AID-Exact": inn.AID(linear.Exact()),
        "JacobianFree": inn.JacobianFree(),
    }[kind]


def tolerance(dtype: torch.dtype, q: float, mode: str = "", solver: str = "") -> float:
    """Relative gradient error allowed at convergence: 1e-10 in float64 and 50 × the stop of
    :func:`solve_tol` in float32, grown by the conditioning of ``I − J`` (``1/(1 − q)``).
    Below 1e-8 in float64 for every ``q < 0.95``.  ITD through Anderson or Broyden in
    float32 gets 100 times more: it differentiates the mixing coefficients, whose derivative
    is not converged at float32's stop (and is noise past convergence)."""
    if dtype == torch.float64:
        return 1e-10 / (1 - q)
    quasi_newton_itd = mode == "ITD" and solver in ("Anderson", "Broyden")
    return 50 * solve_tol(dtype, q) / (1 - q) * (100 if quasi_newton_itd else 1)


SOLVERS = ["FixedPointIteration", "Anderson", "Broyden"]
MODES = ["ITD", "AID-Neumann", "AID-NormalCG", "AID-GMRES", "AID-Exact", "JacobianFree"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
@given(problem=problems())
def test_every_solver_and_mode_agrees_with_the_dense_gradient(solver, mode, problem):
    cell, x, R, q = problem
    unrolled = mode == "ITD" and solver == "FixedPointIteration" and x.dtype == torch.float32
    solve = forward_solver(solver, x.dtype, q, unrolled)
    grads, stats = layer_gradients(cell, x, R, solve, backward_mode(mode, x.dtype, q))
    assert stats.converged
    if mode.startswith("AID"):
        assert stats.backward.converged
    # JacobianFree is defined as the gradient through one step at w*: v = R instead of (I − J)⁻ᵀ R
    reference = dense(cell, x, R, (lambda J, r: r) if mode == "JacobianFree" else None)
    assert relative_error(grads, reference) <= tolerance(x.dtype, q, mode, solver)


def truncated_neumann(K: int):
    """``v = Σ_{j<K} (Jᵀ)ʲ r``: what ITD truncated to K computes from a converged start."""

    def v_of(J: Tensor, r: Tensor) -> Tensor:
        v, term = torch.zeros_like(r), r
        for _ in range(K):
            v, term = v + term, J.T @ term
        return v

    return v_of


@given(problem=problems(), K=st.integers(1, 12), head=st.integers(0, 3))
def test_truncated_itd_from_the_fixed_point_is_the_truncated_neumann_series(problem, K, head):
    cell, x, R, q = problem
    with torch.no_grad():
        w_star, _ = forward_solver("FixedPointIteration", x.dtype, q).solve(lambda z: cell(z, x), cell.initial_state(x))
    solver = inn.FixedPointIteration(max_iter=K + head, tol=0.0)
    grads, _ = layer_gradients(cell, x, R, solver, inn.ITD(truncate=K), z0=w_star)
    assert relative_error(grads, dense(cell, x, R, truncated_neumann(K))) <= tolerance(x.dtype, q)


@st.composite
def monotone_problems(draw):
    """(map, x, R, m): a random ``MonotoneFC`` (float64) with margin m, an input batch and a cotangent."""
    m = draw(st.floats(0.2, 1.0, allow_subnormal=False))
    batch, n_in, width = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    with torch.random.fork_rng():
        torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
        cell = inn.maps.MonotoneFC(n_in, width, m=m, dtype=torch.float64)
        x, R = torch.randn(batch, n_in, dtype=torch.float64), torch.randn(batch, width, dtype=torch.float64)
    return cell, x, R, m


def splitting_solver(kind: str, cell: inn.maps.MonotoneFC) -> inn.ForwardSolver:
    if kind == "PeacemanRachford":
        return inn.PeacemanRachford(max_iter=2000, tol=1e-13, alpha=1.0)
    with torch.no_grad():  # forward–backward converges for α < 2m / ‖I − W‖²
        L = float(torch.linalg.matrix_norm(torch.eye(cell.width, dtype=torch.float64) - cell.weight, 2))
    return inn.ForwardBackward(max_iter=5000, tol=1e-13, alpha=cell.m / L**2)


@pytest.mark.parametrize("mode", ["ITD", "AID-GMRES", "AID-Exact", "JacobianFree"])
@pytest.mark.parametrize("solver", ["ForwardBackward", "PeacemanRachford"])
@given(problem=monotone_problems())
def test_splitting_solvers_on_monotone_maps_agree_with_the_dense_gradient(solver, mode, problem):
    """ReLU(W z + U x + b) with I − W ⪰ m I: ‖(I − J)⁻¹‖ <= 1/m replaces 1/(1 − q)."""
    cell, x, R, m = problem
    params = list(cell.parameters())
    xr = x.detach().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", inn.ConvergenceWarning)
        w, stats = inn.fixed_point(cell, xr, solver=splitting_solver(solver, cell),
                                   backward=backward_mode(mode, torch.float64, 0.0))
        grads = torch.autograd.grad((R * w).sum(), [*params, xr])
    assert stats.converged
    w = w.detach()
    J = torch.func.jacrev(lambda z: cell(z, x))(w).reshape(w.numel(), w.numel()).detach()
    r = R.reshape(-1)
    v = r if mode == "JacobianFree" else torch.linalg.solve((torch.eye(w.numel(), dtype=torch.float64) - J).T, r)
    reference = torch.autograd.grad((v.reshape(w.shape) * cell(w, xr)).sum(), [*params, xr])
    assert relative_error(list(grads), list(reference)) <= 1e-10 / m
