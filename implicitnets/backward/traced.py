"""AID inside ``torch.compile``: the first-order implicit gradient with no host read.

Under an outer ``torch.compile`` the eager AID (:mod:`implicitnets.backward.aid`) would break
Dynamo's graph: its ``autograd.Function`` defines forward-mode and ``vmap`` rules, which
Dynamo does not trace, and its backward reads the adjoint solve's residual on the host to
apply the failure policy.  Here the same gradient is written so that Dynamo traces the
forward solve, the differentiable step and the adjoint solve into the compiled graphs:

* the forward solve ``w* = Φ(w*, u)`` runs without autograd, its statistics as tensors;
* one differentiable step ``fz = Φ(w*, u; θ)`` is recorded;
* :class:`TracedAdjoint` returns ``w*`` attached to ``fz``; its backward maps the incoming
  gradient ``g`` to ``v`` solving ``(I − Jᵀ) v = g`` with the linear solver, ``J = ∂₁Φ(w*)``
  the map's closed-form Jacobian (built once, in the forward), and autograd carries ``v``
  through ``fz``'s graph: ``∂₂Φᵀ v``.

This is the eager first-order gradient, computed by the same operations.  It applies to a
tensor state of any map whose step is the map's own (``inject``/``step``, or ``f(w, x)``):
``J`` is the closed-form ``jacobian`` when it reads only values (``jacobian_needs_graph =
False``, e.g. :class:`~implicitnets.maps.TanhMap`), else ``torch.func.vjp`` of the step at
``w*``, built once when the backward runs (a map written by a user).  Tuple states keep the
eager path (Dynamo runs it outside the graph).  Inside the compiled graph the failure
policy is not applied and the backward statistics are not recorded (reading them would need
the host); derivatives of the backward itself (``create_graph=True``) are not defined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..linear import LinearSolver
from ..maps.protocol import parts_of, step_parts
from ..operator import IdentityMinus, LinearOperator, func_jacobian
from ..solvers import SolverStats
from ..state import State
from .base import Problem

__all__ = ["TracedAdjoint", "run_traced"]


class _Adjoint:
    """What the backward needs: ``J`` (or how to build it there), the linear solver and the
    start of the solve."""

    def __init__(self, J: LinearOperator | Callable[[], LinearOperator], linear_solver: LinearSolver,
                 start: Tensor | None) -> None:
        self.J, self.linear_solver, self.start = J, linear_solver, start

    def operator(self) -> LinearOperator:
        return self.J if isinstance(self.J, LinearOperator) else self.J()


def _step_jacobian(step: Callable[[Tensor, State], Tensor], w: Tensor, u: State) -> LinearOperator:
    """``J = ∂₁Φ(w, u)`` by ``torch.func`` on the step at ``w`` (``u`` and the map's tensors held
    fixed)."""
    u = u.detach() if isinstance(u, Tensor) else tuple(t.detach() for t in u)
    return func_jacobian(lambda x: step(x, u), w.detach())


class TracedAdjoint(torch.autograd.Function):
    """``w*`` attached to ``fz = Φ(w*, u; θ)``; inputs ``(adjoint, fz, w*)``.  Backward:
    ``g ↦ v = (I − Jᵀ)⁻¹ g``, the cotangent of ``fz``."""

    @staticmethod
    def forward(adjoint: _Adjoint, fz: Tensor, z: Tensor) -> Tensor:
        return z.to(fz.dtype, copy=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.adjoint = inputs[0]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor, None]:
        a: _Adjoint = ctx.adjoint
        b = g.to(torch.promote_types(g.dtype, torch.float32))
        start = a.start.to(b) if a.start is not None and a.start.shape == b.shape else None
        v, _ = a.linear_solver.solve(IdentityMinus(a.operator()).T, b, start)
        return None, v.to(g.dtype), None


def run_traced(problem: Problem, linear_solver: LinearSolver) -> tuple[State, SolverStats] | None:
    """AID's solve and differentiable step for Dynamo to trace, or ``None`` when the state is a
    tuple (or the step is not the map's own)."""
    # the map's parts from the module itself: Dynamo does not resolve a bound method's __self__
    form = parts_of(problem.module) if problem.module is not None else step_parts(problem.step)
    if form.step != problem.step or not isinstance(problem.z0, Tensor):
        return None
    with torch.no_grad():
        z, stats = problem.solver.solve(problem.map(), problem.z0)
    if not problem.needs_grad:
        return z, stats
    z_in = z.detach()
    with torch.enable_grad():
        fz = problem.step(z_in, problem.u)
    if form.jacobian is not None and not form.jacobian_needs_graph:
        J: LinearOperator | Callable[[], LinearOperator] = form.jacobian(z_in, problem.u, fz)
    else:
        J = lambda: _step_jacobian(problem.step, z_in, problem.u)
    return TracedAdjoint.apply(_Adjoint(J, linear_solver, problem.adjoint_x0), fz, z), stats
