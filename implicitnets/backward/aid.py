"""Approximate implicit differentiation (AID) as an ``autograd.Function``.

The forward pass solves ``w* = Φ(w*, x)`` without autograd, then takes one differentiable
step ``fz = Φ(w*.detach(), x)``.  The returned tensor has the value of the solver's ``w*``
(so the forward value does not depend on the backward mode: ITD returns the same) and is
attached to ``fz``'s graph by an ``autograd.Function`` whose backward maps the incoming
gradient ``g`` to ``v = (I − Jᵀ)⁻¹ g`` with ``J = ∂₁Φ(w*)`` (an operator built once, from the
map's closed form or from that step's graph), and lets autograd carry ``v`` through
``fz``'s graph: ``∂₂Φᵀ v``.  This is the paper's AID at ``w_t``: ``∇₁E`` and ``∂Φ`` both at
the solver's last iterate.  The backward sees exactly the forward's weights and dropout
masks.  No tensor hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from ..bound_map import BoundMap
from ..failure import AdjointFailure, FailurePolicy, Warn
from ..linear import LinearSolver
from ..operator import GraphJacobian, LinearOperator, closed_form, needs_graph
from ..solvers import SolverStats
from ..state import State, map_parts, pack, parts
from .adjoint import adjoint_message, solve_adjoint
from .base import BackwardMode, Problem, transforms_active

__all__ = ["AID"]


@dataclass(frozen=True)
class AID(BackwardMode):
    """Approximate implicit differentiation with a linear solver for the adjoint system.

    Backward solves ``(I − ∂₁Φ(w*)ᵀ) v = g`` with ``linear_solver`` (``linear.Neumann``,
    ``CG`` — symmetric ∂₁Φ only —, ``NormalCG``, ``GMRES``, ``Exact`` or any
    :class:`~implicitnets.linear.LinearSolver`) and passes ``v`` through the forward's
    differentiable step, giving ``∂₂Φᵀ v``.  With ``warm_start=True`` a
    :class:`~implicitnets.FixedPointLayer` starts each solve from the previous call's
    ``v`` (kept in ``stats.adjoint``) when its shape matches.  ``on_failure`` chooses what
    a failed solve does (:mod:`implicitnets.failure`).  Not available inside ``torch.func``
    transforms (the backward runs its own autograd calls on the stored step); use ITD or
    JacobianFree there.
    """

    linear_solver: LinearSolver
    on_failure: FailurePolicy = Warn()
    warm_start: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.linear_solver, LinearSolver):
            raise ValueError(
                "AID: linear_solver must be an implicitnets.linear.LinearSolver (e.g. linear.GMRES(...)); "
                f"got {self.linear_solver!r}"
            )
        if not isinstance(self.on_failure, FailurePolicy):
            raise ValueError(f"AID: on_failure must be a FailurePolicy (e.g. Warn(), Raise()); got {self.on_failure!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"AID: warm_start must be a bool, got {self.warm_start!r}")

    def run(self, problem: Problem) -> tuple[State, SolverStats]:
        if self.on_failure.needs_itd and problem.module is None:
            raise ValueError(f"AID(on_failure={self.on_failure!r}) needs the map to be an nn.Module")
        if problem.needs_grad and any(transforms_active(t) for t in (*parts(problem.u), *parts(problem.z0))):
            raise NotImplementedError(
                "AID cannot run inside a torch.func transform (grad/vjp/jacrev/vmap): its backward solves "
                "the adjoint system with autograd calls on the stored map step, which functorch does not "
                "trace. Use ITD() or JacobianFree(), which compose with torch.func."
            )
        with torch.no_grad():
            z, stats = problem.solver.solve(problem.map(), problem.z0)
        if not problem.needs_grad:
            return z, stats
        closed, graph = closed_form(problem.step), needs_graph(problem.step)
        with torch.enable_grad():
            # a J that reads only values needs no graph through w (and the backward no w-gradient)
            z_in = map_parts(lambda t: t.detach().requires_grad_(graph), z)
            fz = problem.step(z_in, problem.u)
        J = closed(z_in, problem.u, fz) if closed is not None else GraphJacobian(fz, z_in)
        node = _Node(self, problem, stats, J, z, fz)
        extra = (*parts(problem.u), *problem.params) if self.on_failure.needs_itd else ()
        n = len(parts(fz))
        out = _AIDFunction.apply(node, n, *parts(fz), *extra)
        return pack(fz, out if isinstance(out, tuple) else (out,)), stats


class _Node:
    """What AID's backward needs: the mode, the problem, the operator ``J``, the solution
    ``z`` (the output's value) and the differentiable step ``fz``."""

    def __init__(self, mode: AID, problem: Problem, stats: SolverStats, J: LinearOperator, z: State, fz: State):
        self.mode, self.problem, self.stats, self.J, self.fz = mode, problem, stats, J, fz
        self.z = tuple(t.detach() for t in parts(z))
        self.shapes = [t.shape for t in parts(fz)]
        self.single = isinstance(fz, Tensor)

    def flatten(self, grads: tuple[Tensor, ...]) -> Tensor:
        return grads[0] if self.single else torch.cat([g.reshape(-1) for g in grads])

    def unflatten(self, v: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.single:
            return (v.to(like[0].dtype),)
        chunks = torch.split(v, [t.numel() for t in like])
        return tuple(c.reshape(t.shape).to(t.dtype) for c, t in zip(chunks, like))

    def itd_gradients(self, g: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """Gradients w.r.t. ``(*parts(u), *params)`` of the solver's unrolled iterations."""
        p = self.problem
        u = map_parts(lambda t: t.detach().requires_grad_(), p.u)  # the path through u continues outside
        with torch.enable_grad(), parametrize.cached():
            z, _ = p.solver.solve(BoundMap(p.step, u, p.map().map), p.z0)
            return torch.autograd.grad(parts(z), (*parts(u), *p.params), self.unflatten(g, like), allow_unused=True)


class _AIDFunction(torch.autograd.Function):
    """The value of ``w*`` on the graph of ``fz = Φ(w*, x)``; backward maps ``g`` to ``(I − Jᵀ)⁻¹ g``."""

    @staticmethod
    def forward(ctx: Any, node: _Node, n: int, *tensors: Tensor) -> Any:
        # (the combined forward(ctx, ...) form: a separate setup_context costs a signature bind per call)
        ctx.node, ctx.n, ctx.n_extra = node, n, len(tensors) - n
        outs = tuple(z.to(t.dtype, copy=True) for z, t in zip(node.z, tensors[:n]))  # w*'s value, a copy
        return outs[0] if n == 1 else outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        node: _Node = ctx.node
        mode, stats = node.mode, node.stats
        fz = parts(node.fz)
        grads = tuple(torch.zeros_like(f) if g is None else g for g, f in zip(grads, fz))
        g = node.flatten(grads)
        v, info, finite = solve_adjoint(node.J, g, mode.linear_solver, node.problem.adjoint_x0)
        stats.backward_iterations = info.iterations
        stats.backward_residual = info.residual
        stats.backward_converged = info.converged
        stats.backward_fallback = None
        none_extra = (None,) * ctx.n_extra
        if info.converged and finite:
            stats.adjoint = v.detach()
            return (None, None, *node.unflatten(v, grads), *none_extra)
        failure = AdjointFailure(
            v=v,
            g=g,
            finite=finite,
            message=adjoint_message(mode.linear_solver, info, finite, "AID backward"),
            itd=(lambda b: node.itd_gradients(b, grads)) if ctx.n_extra else None,
        )
        resolution = mode.on_failure.adjoint_failed(failure)
        stats.backward_fallback = resolution.fallback
        cotangent = node.unflatten(resolution.v.to(g.dtype), grads)
        extra = resolution.extra if resolution.extra is not None else none_extra
        return (None, None, *cotangent, *extra)
