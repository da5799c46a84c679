"""Backward modes: how gradients flow through ``w* = Φ(w*, x; θ)``.

With ``E`` a loss of ``w*`` and ``J = ∂₁Φ(w*)``:

* :class:`ITD` — iterative differentiation: reverse mode through the solver's steps
  (memory O(t·d)); ``truncate=K`` keeps the graph of the last K steps only.
* :class:`AID` — approximate implicit differentiation: solve ``(I − Jᵀ) v = ∇E`` with a
  linear solver from :mod:`implicitnets.linear`, then ``∇θ = ∂₂Φᵀ v`` (memory O(d)).
* :class:`JacobianFree` — one differentiable step at ``w*`` (``v = ∇E``; Fung et al. 2022).

AID is an ``autograd.Function`` whose backward reuses the graph of one differentiable map
step ``Φ(w*.detach(), x)`` taken in the forward pass: ``Jᵀu`` is a vector–Jacobian product
on that graph, so the backward sees exactly the forward's weights; no tensor hooks.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from . import linear
from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .failure import FailurePolicy, FallbackITD, FallbackJacobianFree, Raise, Warn
from .solvers import ForwardSolver, SolverStats

__all__ = ["ITD", "AID", "JacobianFree", "BackwardMode", "Problem"]

_LINEAR_SOLVERS = (linear.FixedPoint, linear.CG, linear.NormalCG, linear.GMRES, linear.Exact)


@dataclass(frozen=True)
class Problem:
    """One fixed-point problem ``z = step(z, u)`` as handed to a backward mode.

    ``u`` is the (differentiable) injected input, ``params`` the map's trainable tensors
    (used only by the ITD fallback), ``needs_grad`` whether any gradient is wanted.
    """

    step: Callable[[Tensor, Tensor], Tensor]
    u: Tensor
    z0: Tensor
    solver: ForwardSolver
    params: tuple[Tensor, ...]
    needs_grad: bool
    module: torch.nn.Module | None = None

    def map(self) -> Callable[[Tensor], Tensor]:
        return lambda z: self.step(z, self.u)


def _with_iterations(solver: ForwardSolver, max_iter: int, tol: float | None = None) -> ForwardSolver:
    changes: dict[str, Any] = {"max_iter": max_iter}
    if tol is not None:
        changes["tol"] = tol
    return dataclasses.replace(solver, **changes)


def _merge(first: SolverStats, second: SolverStats) -> SolverStats:
    return SolverStats(
        iterations=first.iterations + second.iterations,
        residual=second.residual,
        converged=second.converged,
        trace=first.trace + second.trace,
    )


@dataclass(frozen=True)
class ITD:
    """Iterative differentiation: backpropagate through the forward solver's iterations.

    ``truncate=None`` keeps the whole graph (memory O(t·d)).  ``truncate=K`` runs the first
    ``max_iter − K`` iterations without autograd (stopping at ``tol``), then exactly K
    differentiable iterations of the same solver (Shaban et al. 2019).  From a converged
    ``w*`` this equals AID with ``linear.FixedPoint(max_iter=K)``.
    """

    truncate: int | None = None

    def __post_init__(self) -> None:
        if self.truncate is not None and (
            isinstance(self.truncate, bool) or not isinstance(self.truncate, int) or self.truncate < 1
        ):
            raise ValueError(f"ITD: truncate must be None or an int >= 1, got {self.truncate!r}")

    def run(self, problem: Problem) -> tuple[Tensor, SolverStats]:
        solver, g = problem.solver, problem.map()
        K = self.truncate
        if not problem.needs_grad or K is None or K >= solver.max_iter:
            return solver.solve(g, problem.z0)
        with torch.no_grad():
            z, head = _with_iterations(solver, solver.max_iter - K).solve(g, problem.z0)
        z, tail = _with_iterations(solver, K, tol=0.0).solve(g, z)
        return z, _merge(head, tail)


@dataclass(frozen=True)
class JacobianFree:
    """Jacobian-free backward (JFB / one-step gradient): solve without autograd, then take
    one differentiable step ``w = Φ(w*, x)``, i.e. ``v = ∇E`` instead of ``(I − Jᵀ)⁻¹∇E``."""

    def run(self, problem: Problem) -> tuple[Tensor, SolverStats]:
        with torch.no_grad():
            z, stats = problem.solver.solve(problem.map(), problem.z0)
        if not problem.needs_grad:
            return z, stats
        return problem.step(z.detach(), problem.u), stats


@dataclass(frozen=True)
class AID:
    """Approximate implicit differentiation with a linear solver for the adjoint system.

    Backward solves ``(I − ∂₁Φ(w*)ᵀ) v = g`` with ``linear_solver`` (``linear.FixedPoint``,
    ``CG`` — symmetric ∂₁Φ only —, ``NormalCG``, ``GMRES`` or ``Exact``), warm-started at
    ``g``'s zero, and passes ``v`` through the forward's differentiable step, giving
    ``∂₂Φᵀ v``.  ``on_failure`` chooses what happens when that solve fails
    (see :mod:`implicitnets.failure`).
    """

    linear_solver: linear.LinearSolver
    on_failure: FailurePolicy = Warn()

    def __post_init__(self) -> None:
        if not isinstance(self.linear_solver, _LINEAR_SOLVERS):
            raise ValueError(
                "AID: linear_solver must be one of implicitnets.linear.FixedPoint, CG, NormalCG, "
                f"GMRES, Exact; got {self.linear_solver!r}"
            )
        if not isinstance(self.on_failure, (Warn, Raise, FallbackITD, FallbackJacobianFree)):
            raise ValueError(
                "AID: on_failure must be Warn(), Raise(), FallbackITD() or FallbackJacobianFree(); "
                f"got {self.on_failure!r}"
            )

    def run(self, problem: Problem) -> tuple[Tensor, SolverStats]:
        if isinstance(self.on_failure, FallbackITD) and problem.module is None:
            raise ValueError("AID(on_failure=FallbackITD()) needs the map to be an nn.Module")
        with torch.no_grad():
            z, stats = problem.solver.solve(problem.map(), problem.z0)
        if not problem.needs_grad:
            return z, stats
        z_leaf = z.detach().requires_grad_()
        fz = problem.step(z_leaf, problem.u)
        adjoint = _Adjoint(self, problem, stats, z_leaf, fz)
        extra = (problem.u, *problem.params) if isinstance(self.on_failure, FallbackITD) else ()
        return _AIDFunction.apply(fz, adjoint, *extra), stats


BackwardMode = ITD | AID | JacobianFree


class _Adjoint:
    """The state AID's backward needs: the graph of ``fz = Φ(z, x)`` and the options."""

    def __init__(self, mode: AID, problem: Problem, stats: SolverStats, z: Tensor, fz: Tensor):
        self.mode, self.problem, self.stats, self.z, self.fz = mode, problem, stats, z, fz

    def vjp(self, u: Tensor) -> Tensor:
        """``Jᵀu`` on the forward step's graph."""
        (out,) = torch.autograd.grad(self.fz, self.z, u, retain_graph=True)
        return out

    def jvp_via_double_vjp(self) -> Callable[[Tensor], Tensor]:
        """``y ↦ J y``: differentiate the linear map ``u ↦ Jᵀu`` once more."""
        dummy = torch.zeros_like(self.fz, requires_grad=True)
        (jtu,) = torch.autograd.grad(self.fz, self.z, dummy, retain_graph=True, create_graph=True)

        def jvp(y: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(jtu, dummy, y, retain_graph=True)
            return out

        return jvp

    def solve(self, g: Tensor) -> tuple[Tensor, linear.LinearInfo]:
        solver = self.mode.linear_solver
        with torch.enable_grad():
            rmatvec = None
            if isinstance(solver, linear.NormalCG):
                jvp = self.jvp_via_double_vjp()
                rmatvec = lambda y: y - jvp(y)  # noqa: E731
            return solver.solve(lambda v: v - self.vjp(v), g, rmatvec=rmatvec)

    def itd_gradients(self, g: Tensor) -> tuple[Tensor | None, ...]:
        """Gradients w.r.t. ``(u, *params)`` of the solver's unrolled iterations."""
        p = self.problem
        u = p.u.detach().requires_grad_()  # the path through u continues in the outer graph
        # Parametrizations in eval mode re-use their state (e.g. the power iteration's
        # vectors) instead of advancing it, so the recomputation sees the forward's weights.
        parametrizations = [m for m in p.module.modules() if isinstance(m, parametrize.ParametrizationList)]
        modes = [m.training for m in parametrizations]
        try:
            for m in parametrizations:
                m.eval()
            with torch.enable_grad(), parametrize.cached():
                z, _ = p.solver.solve(lambda w: p.step(w, u), p.z0)
                fz = p.step(z, u)  # AID's output is one step past the solve: Φ(w_t)
                grads = torch.autograd.grad(fz, (u, *p.params), g, allow_unused=True)
        finally:
            for m, mode in zip(parametrizations, modes):
                m.train(mode)
        return grads


class _AIDFunction(torch.autograd.Function):
    """Identity on ``fz = Φ(w*, x)`` whose backward maps ``g`` to ``(I − Jᵀ)⁻¹ g``."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, adjoint: _Adjoint, *extra: Tensor) -> Tensor:
        ctx.adjoint = adjoint
        ctx.n_extra = len(extra)
        return fz.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        adjoint: _Adjoint = ctx.adjoint
        policy, stats = adjoint.mode.on_failure, adjoint.stats
        none_extra = (None,) * ctx.n_extra
        v, info = adjoint.solve(g)
        stats.backward_iterations = info.iterations
        stats.backward_residual = info.residual
        stats.backward_converged = info.converged
        stats.backward_fallback = None
        finite = math.isfinite(info.residual) and bool(torch.isfinite(v).all())
        if info.converged and finite:
            return (v, None, *none_extra)
        name = type(adjoint.mode.linear_solver).__name__
        what = "produced NaN/Inf" if not finite else "did not converge"
        message = (
            f"AID backward: the {name} solve of (I - J^T) v = g {what} "
            f"(relative residual {info.residual:.3e} after {info.iterations} iterations); "
            "the map may not be a contraction at the fixed point"
        )
        if isinstance(policy, Raise):
            raise (NonFiniteError if not finite else ConvergenceError)(message)
        if isinstance(policy, Warn):
            if not finite:
                raise NonFiniteError(message)
            warnings.warn(message, ConvergenceWarning, stacklevel=2)
            return (v, None, *none_extra)
        if isinstance(policy, FallbackJacobianFree):
            stats.backward_fallback = "JacobianFree"
            warnings.warn(message + "; falling back to the Jacobian-free gradient", ConvergenceWarning, stacklevel=2)
            return (g, None, *none_extra)
        stats.backward_fallback = "ITD"
        warnings.warn(message + "; falling back to ITD", ConvergenceWarning, stacklevel=2)
        grads = adjoint.itd_gradients(g)
        if not all(t is None or bool(torch.isfinite(t).all()) for t in grads):
            raise NonFiniteError(message + "; the ITD fallback gradient is NaN/Inf too")
        return (torch.zeros_like(g), None, *grads)
