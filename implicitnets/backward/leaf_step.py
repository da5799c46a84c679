"""AID's generic path: the step of a map without a closed-form Jacobian, recorded once per
solve with the state and the injected input as leaves of their own graph.

``fz = Φ(w, u)`` is evaluated once at the solver's ``w*`` from fresh leaves ``w`` and ``u``
(the map's own tensors ``P`` as they are).  That one graph serves the whole backward:

* ``J = ∂₁Φ(w*)`` is a :class:`~implicitnets.GraphJacobian` on it, so each product ``Jᵀv``
  of the adjoint solve ``(I − Jᵀ) v = g`` walks only the step's own operations: the graph
  that produced ``x`` (an encoder, say) lies behind the leaf ``u`` and is never visited;
* ``(ū, P̄) = ∂_{u,P}Φᵀ v`` is one more walk at the end, restricted to ``u`` and ``P`` (no
  product with ``J`` is spent on the leaf ``w``), and is handed to autograd as the gradient
  of ``u`` and ``P``.

Both read the same evaluation, so they see the same weights and the same random draws.  A
step that depends on a tensor needing a gradient that is neither ``u`` nor one of ``P``
(captured by a closure) is not recorded here: :meth:`LeafStep.record` returns ``None`` and
AID keeps the step on the caller's graph, through which that tensor gets its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..operator import GraphJacobian, walk
from ..state import State, map_parts, parts
from .base import Problem

__all__ = ["LeafStep", "foreign_leaf"]


def foreign_leaf(outputs: tuple[Tensor, ...], known: tuple[Tensor, ...], stops: tuple[Tensor, ...]) -> Tensor | None:
    """A tensor that needs a gradient, that the graph of ``outputs`` reaches, and that is none
    of ``known`` (e.g. one captured by a closure); the graphs that produced ``stops`` are not
    searched.  ``None`` when there is none."""
    ids = {id(t) for t in known}
    ends = {t.grad_fn for t in stops if t.grad_fn is not None}
    seen: set = set()
    stack = [f.grad_fn for f in outputs if f.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen or node in ends:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None and id(leaf) not in ids:
            return leaf
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return None


class LeafStep:
    """``fz = Φ(w, u)`` recorded from leaves ``w`` (the detached ``w*``) and ``u``.

    Build it with :meth:`record`.  :attr:`fz` is the step's value, :attr:`J` the operator
    ``∂₁Φ(w*)`` and :meth:`pullback` gives ``∂_{u,P}Φᵀ v``.
    """

    def __init__(self, w: State, u: State, fz: State, params: tuple[Tensor, ...]) -> None:
        self.w, self.fz, self.params = w, fz, params
        self.u = parts(u)
        self.J = GraphJacobian(fz, w)
        #: the tensors the final walk differentiates: the parts of ``u`` and ``P`` that need a gradient
        self.wrt = tuple(t for t in (*self.u, *params) if t.requires_grad)

    @classmethod
    def record(cls, problem: Problem, z: State) -> LeafStep | None:
        """Evaluate the step at ``z`` from leaves, or ``None`` when it depends on a tensor that
        needs a gradient and is neither ``problem.u`` nor one of ``problem.params``."""
        with torch.enable_grad():
            w = map_parts(lambda t: t.detach().requires_grad_(), z)
            u = map_parts(lambda t: t.detach().requires_grad_(t.requires_grad), problem.u)
            fz = problem.step(w, u)
        step = cls(w, u, fz, problem.params)
        return step if step.self_contained() else None

    def self_contained(self) -> bool:
        """Whether the graph of :attr:`fz` reaches no tensor needing a gradient besides the
        leaves ``w``, ``u`` and the tensors ``P`` (whose own graphs are not searched)."""
        return foreign_leaf(parts(self.fz), (*parts(self.w), *self.u, *self.params), self.params) is None

    def pullback(self, v: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """``∂_{u,P}Φᵀ v`` for the parts of ``u`` and then ``P`` (``None`` for a tensor that
        needs no gradient or that the step does not use).

        Args:
            v: The cotangent of :attr:`fz`, one tensor per part.
        """
        grads = iter(walk(parts(self.fz), self.wrt, v, unreached="none") if self.wrt else ())
        return tuple(next(grads) if t.requires_grad else None for t in (*self.u, *self.params))
