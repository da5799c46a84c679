"""The implicit functions behind AID, with derivatives of every order.

Two ``torch.autograd.Function`` s, each defined by the equation it solves:

* :class:`FixedPoint` — ``w* = φ(w*, u, P)`` (a forward solver).  Reverse mode:
  ``v = (I − Jᵀ)⁻¹ ḡ`` and ``(ū, P̄) = ∂_{u,P}φᵀ v``; forward mode:
  ``ẇ = (I − J)⁻¹ ∂_{u,P}φ · (u̇, Ṗ)``, with ``J = ∂_w φ(w*, u, P)``.
* :class:`LinearFixedPoint` — ``x = L x + b`` with ``L = Jᵀ`` (the adjoint system) or
  ``L = J`` (the tangent system), solved by a :class:`~implicitnets.linear.LinearSolver`.
  It is a fixed-point problem too: reverse mode solves the transposed system
  ``y = Lᵀ y + x̄`` and passes ``y`` through ``∂_args (L x)``; forward mode solves
  ``ẋ = L ẋ + ḃ + ∂_args (L x) · ȧrgs``.

Every rule is written with these two functions, ``torch.func.vjp`` / ``torch.func.jvp`` of
``φ`` and plain tensor operations, so the rules are differentiable again (Hessian–vector
products, MAML, ``torch.func.hessian``), compose with forward mode and with every
``torch.func`` transform.  Each solve runs on plain tensors inside ``forward``, where the
solvers may read host values (stopping tests, statistics).  Under ``vmap`` the
:meth:`vmap` rules solve the mapped problems as one batch when the map is row-separable
(``map.row_separable = True``: each sample's output depends only on its own rows) and its
tensors are not mapped; otherwise one solve per mapped problem.

The first-order eager backward of AID (no ``create_graph``, no transform) keeps its own
fast path in :mod:`implicitnets.backward.aid`; these rules take over whenever a derivative
of the backward itself may be needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..bound_map import BoundMap
from ..failure import AdjointFailure, FailurePolicy
from ..linear import LinearSolver
from ..maps.protocol import step_parts
from ..operator import IdentityMinus, LinearOperator, func_jacobian
from ..solvers import ForwardSolver, SolverStats
from ..state import State, flat_vector, from_flat_vector, pack, parts
from .adjoint import adjoint_message, check_finite
from .base import Problem
from .functional_step import FunctionalStep

__all__ = ["Spec", "make_spec", "FixedPoint", "LinearFixedPoint"]


@dataclasses.dataclass
class Spec:
    """What the implicit functions need besides tensors.

    ``phi`` is the map as a pure function; ``owner`` the map object handed to the forward
    solver (:class:`~implicitnets.BoundMap`); ``state_single``/``u_single`` whether the
    state and the input are tensors (else tuples of ``n_w``/``n_u`` parts); ``closed`` the
    map's closed-form ``jacobian`` when it reads only values (used for values only).  ``stats`` receives the forward
    solve's statistics, ``record`` (if set) the first adjoint solve's.  ``differentiable``
    False makes :class:`FixedPoint` a plain solve (JacobianFree).
    """

    phi: FunctionalStep
    owner: object
    solver: ForwardSolver
    linear_solver: LinearSolver | None
    on_failure: FailurePolicy | None
    state_single: bool
    n_w: int
    u_single: bool
    n_u: int
    n_p: int
    row_separable: bool
    closed: Callable[..., LinearOperator] | None
    #: the tensors ``P`` the map holds during the forward solve (their values need no substitution)
    held: tuple[Tensor, ...] = ()
    stats: SolverStats | None = None
    record: SolverStats | None = None
    differentiable: bool = True
    #: the eager first-order fast path of AID (``None`` here)
    fast: Any = None

    def fresh(self, **changes: Any) -> Spec:
        """A copy for a new solve (no statistics, no fast path)."""
        return dataclasses.replace(self, stats=None, fast=None, **changes)

    # structure helpers -------------------------------------------------------------------
    def split(self, tensors: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], State, tuple[Tensor, ...]]:
        """``(w parts, u, P)`` from ``(*w, *u, *P)``."""
        w = tensors[: self.n_w]
        u = tensors[self.n_w : self.n_w + self.n_u]
        return w, (u[0] if self.u_single else tuple(u)), tuple(tensors[self.n_w + self.n_u :])

    def state(self, w: tuple[Tensor, ...]) -> State:
        return w[0] if self.state_single else tuple(w)

    def flatten(self, w: tuple[Tensor, ...]) -> Tensor:
        """A state as the vector the linear systems act on (itself for a tensor state)."""
        return flat_vector(w, self.state_single)

    def unflatten(self, x: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return from_flat_vector(x, like, self.state_single)


def make_spec(
    problem: Problem, linear_solver: LinearSolver | None, on_failure: FailurePolicy | None, differentiable: bool = True
) -> Spec:
    """The :class:`Spec` of a backward mode's problem."""
    form = step_parts(problem.step)
    return Spec(
        phi=problem.functional(),
        owner=form.owner,
        solver=problem.solver,
        linear_solver=linear_solver,
        on_failure=on_failure,
        state_single=isinstance(problem.z0, Tensor),
        n_w=len(parts(problem.z0)),
        u_single=isinstance(problem.u, Tensor),
        n_u=len(parts(problem.u)),
        n_p=len(problem.params),
        row_separable=form.row_separable,
        closed=form.jacobian if not form.jacobian_needs_graph else None,
        held=problem.params,
        differentiable=differentiable,
    )


# the linear maps of the two systems, as differentiable functions of (x, w, u, P) -----------
def _adjoint_product(spec: Spec, x: Tensor, w: tuple[Tensor, ...], u: State, P: tuple[Tensor, ...]) -> Tensor:
    """``Jᵀ x`` with ``J = ∂_w φ(w, u, P)``."""
    _, pullback = torch.func.vjp(lambda ws: spec.phi(ws, u, P), spec.state(w))
    return spec.flatten(parts(pullback(pack(spec.state(w), spec.unflatten(x, w)))[0]))


def _jvp(fn: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
    """``∂fn(primals) · tangents`` by reverse mode twice: the pullback of ``fn`` is linear in
    its cotangent, and its own pullback is the Jacobian–vector product.  (Unlike
    ``torch.func.jvp`` this also runs inside ``torch.autograd.forward_ad``'s dual level.)"""
    out, pullback = torch.func.vjp(fn, *primals)
    zeros = torch.utils._pytree.tree_map(torch.zeros_like, out)
    _, transposed = torch.func.vjp(pullback, zeros)
    return transposed(tangents)[0]


def _tangent_product(spec: Spec, x: Tensor, w: tuple[Tensor, ...], u: State, P: tuple[Tensor, ...]) -> Tensor:
    """``J x`` with ``J = ∂_w φ(w, u, P)``."""
    state = spec.state(w)
    out = _jvp(lambda ws: spec.phi(ws, u, P), (state,), ((pack(state, spec.unflatten(x, w)),)))
    return spec.flatten(parts(out))


_PRODUCTS = {"adjoint": _adjoint_product, "tangent": _tangent_product}
_TRANSPOSE = {"adjoint": "tangent", "tangent": "adjoint"}


def _zeros_for(tangents: tuple[Tensor | None, ...], like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(t) if d is None else d for d, t in zip(tangents, like))


def _jacobian_operator(spec: Spec, w: tuple[Tensor, ...], u: State, P: tuple[Tensor, ...]) -> LinearOperator:
    """``J`` at ``(w, u, P)`` for the values of a linear solve: the map's closed form when it
    has one (read under the substitution of ``P``), else products by ``torch.func``."""
    state = spec.state(w)
    if spec.closed is not None and spec.state_single:
        with spec.phi.substituted(P):
            return spec.closed(state, u, spec.phi.step(state, u))
    return func_jacobian(lambda ws: spec.phi(ws, u, P), state, lambda s: spec.flatten(parts(s)),
                         lambda x: pack(state, spec.unflatten(x, w)))


def _grads_of_args(
    spec: Spec, kind: str, x: Tensor, y: Tensor, args: tuple[Tensor, ...], needed: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """``∂_args (L(args) x)ᵀ y`` for the inputs that need it."""
    if not any(needed):
        return (None,) * len(args)
    product = _PRODUCTS[kind]
    _, pullback = torch.func.vjp(lambda *a: product(spec, x, *spec.split(a)), *args)
    return tuple(g if need else None for g, need in zip(pullback(y), needed))


def _fold(t: Tensor, dim: int | None, size: int) -> Tensor:
    """A mapped tensor ``(V, B, …)`` as one batch ``(V·B, …)`` (an unmapped one is repeated)."""
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _unfold(t: Tensor, size: int) -> Tensor:
    return t.reshape(size, t.shape[0] // size, *t.shape[1:])


def _can_fold(spec: Spec, batched: tuple[tuple[Tensor, int | None], ...], params_dims: tuple[int | None, ...]) -> bool:
    """Whether mapped problems can be solved as one batch (see the module docstring)."""
    return (
        spec.row_separable
        and all(d is None for d in params_dims)
        and all(t.dim() >= 2 + (d is not None) for t, d in batched)
    )


def _loop(apply: Callable[..., Any], size: int, inputs: tuple[Any, ...], dims: tuple[int | None, ...]) -> Any:
    """Solve the mapped problems one at a time; outputs stacked on dimension 0."""
    outs = []
    for i in range(size):
        args = [t.select(d, i) if d is not None else t for t, d in zip(inputs, dims)]
        out = apply(*args)
        outs.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.stack(o) for o in zip(*outs))


class LinearFixedPoint(torch.autograd.Function):
    """``x = L x + b`` with ``L = Jᵀ`` (``kind="adjoint"``) or ``L = J`` (``"tangent"``),
    ``J = ∂_w φ(w, u, P)``; inputs ``(spec, kind, b, *w, *u, *P)``."""

    @staticmethod
    def forward(spec: Spec, kind: str, b: Tensor, *args: Tensor) -> Tensor:
        w, u, P = spec.split(args)
        J = _jacobian_operator(spec, w, u, P)
        work = torch.promote_types(b.dtype, torch.float32)
        rhs = b.detach().to(work)
        op = IdentityMinus(J).T if kind == "adjoint" else IdentityMinus(J)
        x, info = spec.linear_solver.solve(op, rhs)
        finite = check_finite(x, info)
        if spec.record is not None:
            spec.record.backward.iterations = info.iterations
            spec.record.backward.residual = info.residual
            spec.record.backward.converged = info.converged
            spec.record.backward.fallback = None
        if not (info.converged and finite):
            failure = AdjointFailure(
                v=x, g=rhs, finite=finite,
                message=adjoint_message(spec.linear_solver, info, finite, f"AID ({kind} system)"),
            )
            if spec.on_failure.needs_itd:
                raise NotImplementedError(
                    f"{failure.message}; {spec.on_failure!r} cannot recompute a solve inside a derivative "
                    "of the backward pass or a torch.func transform: use Warn(), Raise() or FallbackJacobianFree()"
                )
            resolution = spec.on_failure.adjoint_failed(failure)
            if spec.record is not None:
                spec.record.backward.fallback = resolution.fallback
            x = resolution.v
        return x.to(b.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        spec, kind = inputs[0], inputs[1]
        ctx.spec, ctx.kind = spec.fresh(record=None), kind
        ctx.save_for_backward(*inputs[3:], output)
        ctx.save_for_forward(*inputs[3:], output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        *args, x = ctx.saved_tensors
        args = tuple(args)
        y = LinearFixedPoint.apply(ctx.spec, _TRANSPOSE[ctx.kind], grad, *args)
        grads = _grads_of_args(ctx.spec, ctx.kind, x, y, args, tuple(ctx.needs_input_grad[3:]))
        return (None, None, y, *grads)

    @staticmethod
    def jvp(ctx: Any, _spec: None, _kind: None, b_dot: Tensor | None, *arg_dots: Tensor | None) -> Tensor:
        *args, x = ctx.saved_tensors
        args = tuple(args)
        rhs = torch.zeros_like(x) if b_dot is None else b_dot
        if any(d is not None for d in arg_dots):
            product = _PRODUCTS[ctx.kind]
            drift = _jvp(lambda *a: product(ctx.spec, x, *ctx.spec.split(a)), args, _zeros_for(arg_dots, args))
            rhs = rhs + drift
        return LinearFixedPoint.apply(ctx.spec, ctx.kind, rhs, *args)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], spec: Spec, kind: str, b: Tensor, *args: Tensor):
        size, dims = info.batch_size, in_dims[2:]
        arg_dims = dims[1:]
        n_state = spec.n_w + spec.n_u
        folded = spec.state_single and _can_fold(
            spec, ((b, dims[0]), *zip(args[:n_state], arg_dims[:n_state])), arg_dims[n_state:]
        )
        if folded:
            flat = [_fold(t, d, size) for t, d in zip((b, *args[:n_state]), dims[: n_state + 1])]
            x = LinearFixedPoint.apply(spec, kind, flat[0], *flat[1:], *args[n_state:])
            return _unfold(x, size), 0
        (x,) = _loop(lambda *a: LinearFixedPoint.apply(spec, kind, *a), size, (b, *args), dims)
        return x, 0


class FixedPoint(torch.autograd.Function):
    """``w* = φ(w*, u, P)``; inputs ``(spec, *fz, *z0, *u, *P)`` (``fz``, the differentiable
    step of AID's eager fast path, only when ``spec.fast`` is set); outputs the parts of ``w*``."""

    @staticmethod
    def forward(spec: Spec, *tensors: Tensor) -> tuple[Tensor, ...]:
        n_fz = len(spec.fast.fz) if spec.fast is not None else 0
        z0 = tensors[n_fz : n_fz + spec.n_w]
        _, u, P = spec.split(tensors[n_fz:])
        if spec.fast is not None:  # solved already: w*'s value, a copy
            return tuple(z.to(d, copy=True) for z, d in zip(spec.fast.z, spec.fast.dtypes))
        held = len(P) == len(spec.held) and all(a is b for a, b in zip(P, spec.held))
        with contextlib.nullcontext() if held else spec.phi.substituted(P):
            z, stats = spec.solver.solve(BoundMap(spec.phi.step, u, spec.owner), spec.state(z0))
        spec.stats = stats
        return parts(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        spec: Spec = inputs[0]
        ctx.spec = spec
        n_fz = len(spec.fast.fz) if spec.fast is not None else 0
        ctx.n_fz = n_fz
        if not spec.differentiable:
            ctx.mark_non_differentiable(*output)
            return
        up = inputs[1 + n_fz + spec.n_w :]
        ctx.save_for_backward(*up, *output)
        ctx.save_for_forward(*up, *output)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        spec: Spec = ctx.spec
        head = (None,) * (1 + spec.n_w)
        if spec.fast is not None and not torch.is_grad_enabled():
            cotangents, extra = spec.fast.backward(grads)
            return (None, *cotangents, *head[1:], *extra)
        if spec.fast is not None:
            spec.fast.check_inputs()
        saved = ctx.saved_tensors
        up, w = saved[: spec.n_u + spec.n_p], saved[spec.n_u + spec.n_p :]
        _, u, P = spec.split((*w, *up))
        g = spec.flatten(_zeros_for(grads, w))
        adjoint = spec.fresh(record=spec.stats)
        v = LinearFixedPoint.apply(adjoint, "adjoint", g, *w, *up)
        needed = tuple(ctx.needs_input_grad[1 + ctx.n_fz + spec.n_w :])
        grads_up: tuple[Tensor | None, ...] = (None,) * len(up)
        if any(needed):
            state = spec.state(w)
            _, pullback = torch.func.vjp(lambda uu, pp: spec.phi(state, uu, pp), u, P)
            gu, gp = pullback(pack(state, spec.unflatten(v, w)))
            grads_up = tuple(g if need else None for g, need in zip((*parts(gu), *gp), needed))
        return (None, *(None,) * ctx.n_fz, *head[1:], *grads_up)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:
        spec: Spec = ctx.spec
        if not spec.differentiable:  # a plain solve (JacobianFree): its outputs carry no tangent
            return (None,) * spec.n_w
        saved = ctx.saved_tensors
        up, w = saved[: spec.n_u + spec.n_p], saved[spec.n_u + spec.n_p :]
        _, u, P = spec.split((*w, *up))
        dots = tangents[1 + ctx.n_fz + spec.n_w :]
        state = spec.state(w)
        du, dp = spec.split((*w, *_zeros_for(dots, up)))[1:]
        drift = _jvp(lambda uu, pp: spec.phi(state, uu, pp), (u, P), (du, dp))
        w_dot = LinearFixedPoint.apply(spec.fresh(), "tangent", spec.flatten(parts(drift)), *w, *up)
        return spec.unflatten(w_dot, w)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], spec: Spec, *tensors: Tensor):
        size, dims = info.batch_size, in_dims[1:]
        n_state = spec.n_w + spec.n_u
        inner = spec.fresh()
        if _can_fold(spec, tuple(zip(tensors[:n_state], dims[:n_state])), dims[n_state:]):
            flat = [_fold(t, d, size) for t, d in zip(tensors[:n_state], dims[:n_state])]
            outs = FixedPoint.apply(inner, *flat, *tensors[n_state:])
            spec.stats = inner.stats
            return tuple(_unfold(o, size) for o in outs), (0,) * len(outs)
        outs = _loop(lambda *a: FixedPoint.apply(inner, *a), size, tensors, dims)
        spec.stats = inner.stats
        return outs, (0,) * len(outs)


# ``Function.apply`` binds its arguments to ``forward``'s signature at every call; a signature
# computed once spares ``inspect`` rebuilding it per solve
for _function in (FixedPoint, LinearFixedPoint):
    _function.forward.__signature__ = inspect.signature(_function.forward)
