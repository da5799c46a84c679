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

For a map without a closed form (the generic path, :mod:`implicitnets.backward.leaf_step`)
that step is recorded from leaves ``w*`` and ``u``: each product ``Jᵀv`` of the adjoint solve
walks only the step's own graph, and ``∂_{u,P}Φᵀ v`` is one walk of it at the end.

That first-order backward is the fast path.  When a derivative of the backward itself may be
needed (``create_graph=True``: Hessian–vector products, MAML, gradient penalties), in
forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``) and under every
``torch.func`` transform, the rules of :mod:`implicitnets.backward.implicit` take over: the
adjoint solve is itself an implicit function, so derivatives of every order are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..bound_map import BoundMap
from ..failure import AdjointFailure, FailurePolicy, Warn
from ..linear import LinearSolver
from ..maps.protocol import step_parts
from ..operator import GraphJacobian, LinearOperator
from ..options import check_bool, check_instance
from ..solvers import SolverStats
from ..state import State, flat_vector, from_flat_vector, map_parts, pack, parts
from ..transforms import transforms_active
from .adjoint import adjoint_message, solve_adjoint
from .base import BackwardMode, Problem
from .implicit import FixedPoint, make_spec
from .leaf_step import LeafStep, foreign_leaf
from .traced import run_traced

__all__ = ["AID"]


@dataclass(frozen=True)
class AID(BackwardMode):
    """Approximate implicit differentiation with a linear solver for the adjoint system.

    Backward solves ``(I − ∂₁Φ(w*)ᵀ) v = g`` with ``linear_solver`` (``linear.Neumann``,
    ``CG`` — symmetric ∂₁Φ only —, ``NormalCG``, ``GMRES``, ``Exact`` or any
    :class:`~implicitnets.linear.LinearSolver`) and passes ``v`` through the forward's
    differentiable step, giving ``∂₂Φᵀ v``.  With ``warm_start=True`` a
    :class:`~implicitnets.FixedPointLayer` starts each solve from the previous call's
    ``v`` (kept in ``stats.backward.adjoint``) when its shape matches.  ``on_failure`` chooses what
    a failed solve does (:mod:`implicitnets.failure`).

    Derivatives of every order are exact at convergence: with ``create_graph=True`` the
    backward is differentiable (its adjoint solve is one more implicit function), forward
    mode solves ``(I − J) ẇ = ∂₂Φ · θ̇`` with the same linear solver, and every
    ``torch.func`` transform (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``,
    ``vmap``, ``functional_call``) composes with it.  The differentiable tensors are ``x``
    and the parameters of an ``nn.Module`` map; a plain callable that captures other tensors
    needing gradients gets its first-order gradient, and a higher-order one raises.
    ``FallbackITD`` is first-order only (it raises inside a higher-order backward).

    Args:
        linear_solver: The :class:`~implicitnets.linear.LinearSolver` of the adjoint system.
        on_failure: The :class:`~implicitnets.FailurePolicy` of a failed adjoint solve;
            ``FallbackITD()`` needs the map to be an ``nn.Module``.
        warm_start: Start a layer's adjoint solve from the previous call's solution.

    Raises:
        ValueError: An option is of the wrong type.
    """

    linear_solver: LinearSolver
    on_failure: FailurePolicy = Warn()
    warm_start: bool = False

    def __post_init__(self) -> None:
        check_instance("AID", "linear_solver", self.linear_solver, LinearSolver, "linear.GMRES(...)")
        check_instance("AID", "on_failure", self.on_failure, FailurePolicy, "Warn(), Raise()")
        check_bool("AID", "warm_start", self.warm_start)

    def next_start(self, previous: SolverStats | None) -> Tensor | None:
        """The previous adjoint solution ``v`` when ``warm_start`` (used if its shape matches).

        Args:
            previous: The :class:`~implicitnets.SolverStats` of the layer's previous call, or
                ``None`` before the first.

        Returns:
            ``previous.backward.adjoint`` when ``warm_start`` and there was a previous call,
            else ``None``.
        """
        return previous.backward.adjoint if self.warm_start and previous is not None else None

    def run(self, problem: Problem) -> tuple[State, SolverStats]:
        if self.on_failure.needs_itd and problem.module is None:
            raise ValueError(f"AID(on_failure={self.on_failure!r}) needs the map to be an nn.Module")
        if torch.compiler.is_compiling():  # traced by Dynamo: no host reads (see backward.traced)
            traced = run_traced(problem, self.linear_solver)
            if traced is not None:
                return traced
        spec = make_spec(problem, self.linear_solver, self.on_failure)
        inputs = (*parts(problem.z0), *parts(problem.u), *problem.params)
        if any(transforms_active(t) for t in inputs):
            # the solve runs inside the Function, on the transforms' plain tensors
            out = FixedPoint.apply(spec, *inputs)
            return pack(problem.z0, out), spec.stats
        with torch.no_grad():
            z, stats = problem.solver.solve(problem.map(), problem.z0)
        if not problem.needs_grad:
            return z, stats
        form = step_parts(problem.step)
        closed, graph = form.jacobian, form.jacobian_needs_graph
        leaf = LeafStep.record(problem, z) if closed is None else None
        if leaf is not None:  # the generic path: J and ∂₂Φ on the step's own graph
            z_in, fz, J = leaf.w, leaf.fz, leaf.J
        else:
            with torch.enable_grad():
                # a J that reads only values needs no graph through w (and the backward no w-gradient)
                z_in = map_parts(lambda t: t.detach().requires_grad_(graph), z)
                fz = problem.step(z_in, problem.u)
            J = closed(z_in, problem.u, fz) if closed is not None else GraphJacobian(fz, z_in)
        spec.stats = stats
        spec.fast = _Eager(self, problem, stats, J, z, z_in, fz, leaf)
        out = FixedPoint.apply(spec, *spec.fast.fz, *inputs)
        return pack(fz, out), stats


class _Eager:
    """AID's first-order backward on the graph of the differentiable step ``fz = Φ(w*, x)``:
    ``g ↦ v = (I − Jᵀ)⁻¹ g`` with the operator ``J`` built in the forward, handed back as
    the cotangent of ``fz`` (then :attr:`fz` holds the parts of ``fz``, inputs of
    :class:`FixedPoint`), or, on the generic path (a :class:`LeafStep`), passed through the
    step's own graph to the gradients of ``u`` and ``P`` (then :attr:`fz` is empty)."""

    def __init__(self, mode: AID, problem: Problem, stats: SolverStats, J: LinearOperator, z: State,
                 z_in: State, fz: State, leaf: LeafStep | None = None):
        self.mode, self.problem, self.stats, self.J, self.leaf = mode, problem, stats, J, leaf
        self.z = tuple(t.detach() for t in parts(z))
        self.z_in, self.out = parts(z_in), parts(fz)
        #: the step's parts attached to :class:`FixedPoint` (none on the generic path)
        self.fz = self.out if leaf is None else ()
        #: the dtypes of w* as returned (the map's output's)
        self.dtypes = tuple(f.dtype for f in self.out)
        self.single = isinstance(fz, Tensor)

    def flatten(self, grads: tuple[Tensor, ...]) -> Tensor:
        return flat_vector(grads, self.single)

    def unflatten(self, v: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return from_flat_vector(v, like, self.single)

    def itd_gradients(self, g: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """Gradients w.r.t. ``(*parts(u), *params)`` of the solver's unrolled iterations."""
        p = self.problem
        u = map_parts(lambda t: t.detach().requires_grad_(), p.u)  # the path through u continues outside
        params = tuple(t.detach().requires_grad_(t.requires_grad) for t in p.params)
        phi = p.functional()
        with torch.enable_grad(), phi.substituted(params):
            z, _ = p.solver.solve(BoundMap(p.step, u, p.map().map), p.z0)
            wrt = (*parts(u), *params)
            used = [t for t in wrt if t.requires_grad]
            grads = iter(torch.autograd.grad(parts(z), used, self.unflatten(g, like), allow_unused=True))
            return tuple(next(grads) if t.requires_grad else None for t in wrt)

    def backward(self, grads: tuple[Tensor | None, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """The cotangents of the attached ``fz`` and the gradients of ``(u, P)`` (on the
        generic path, or after an ITD fallback)."""
        cotangent, extra = self._solve(grads)
        if self.leaf is None:
            return cotangent, extra
        through = self.leaf.pullback(cotangent)
        return (), tuple(a if b is None else b if a is None else a + b for a, b in zip(through, extra))

    def _solve(self, grads: tuple[Tensor | None, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """The cotangent of ``fz`` and, after an ITD fallback, the gradients of ``(u, P)``."""
        mode, stats = self.mode, self.stats
        none_extra = (None,) * (len(parts(self.problem.u)) + len(self.problem.params))
        grads = tuple(torch.zeros_like(f) if g is None else g for g, f in zip(grads, self.out))
        g = self.flatten(grads)
        v, info, finite = solve_adjoint(self.J, g, mode.linear_solver, self.problem.adjoint_x0)
        stats.backward.iterations = info.iterations
        stats.backward.residual = info.residual
        stats.backward.converged = info.converged
        stats.backward.fallback = None
        if info.converged and finite:
            stats.backward.adjoint = v.detach()
            return self.unflatten(v, grads), none_extra
        failure = AdjointFailure(
            v=v,
            g=g,
            finite=finite,
            message=adjoint_message(mode.linear_solver, info, finite, "AID backward"),
            itd=(lambda b: self.itd_gradients(b, grads)) if mode.on_failure.needs_itd else None,
        )
        resolution = mode.on_failure.adjoint_failed(failure)
        stats.backward.fallback = resolution.fallback
        cotangent = self.unflatten(resolution.v.to(g.dtype), grads)
        return cotangent, resolution.extra if resolution.extra is not None else none_extra

    def check_inputs(self) -> None:
        """Refuse a higher-order derivative when the step depends on a tensor that needs a
        gradient but is neither ``x`` nor a parameter of the map (e.g. one captured by a
        closure): the higher-order rules could not see it.  (On the generic path the step was
        recorded only when it depends on no such tensor.)"""
        if self.leaf is not None:
            return
        p = self.problem
        leaf = foreign_leaf(tuple(self.fz), (*self.z_in, *parts(p.u), *p.params), (*parts(p.u), *p.params))
        if leaf is not None:
            raise NotImplementedError(
                "AID: a higher-order derivative (create_graph=True) was requested, but the map depends on a "
                f"tensor of shape {tuple(leaf.shape)} that needs a gradient and is neither the input x nor a "
                "parameter of an nn.Module map (e.g. one captured by a closure). Pass it through x, or make the "
                "map an nn.Module that owns it."
            )
