"""Linear operators: ``J = ∂₁Φ(w)`` and the adjoint system matrix built from it.

A :class:`LinearOperator` has ``mv(x) = A x`` and ``rmv(y) = Aᵀ y`` acting on tensors of
one fixed shape (its ``like``), and the affine forms ``mv_add(x, c, α) = c + α A x`` and
``rmv_add`` that an operator with a closed form evaluates as one fused product.  Every
linear solver in :mod:`implicitnets.linear`, the diagnostics and the hypergradient methods
take such an object; the adjoint system of AID is ``(I − J)ᵀ v = g``, i.e.
``IdentityMinus(J).T``, which is ``I − Jᵀ`` (``IdentityMinus(J.T)``): one product of ``J``
per matrix–vector product, and ``identity_minus()`` recovers ``Jᵀ`` from it for the
Neumann iteration ``v ← Jᵀ v + g``.

:class:`GraphJacobian` builds ``J`` of a map at a point from one differentiable
evaluation: ``Jᵀu`` is a vector–Jacobian product on that graph and ``J y`` differentiates
the linear map ``u ↦ Jᵀu`` once more (built on first use).  A map may instead provide a
closed form (:mod:`implicitnets.maps.jacobian` chooses between the two).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor

from .state import State, parts

__all__ = [
    "LinearOperator",
    "Transposed",
    "IdentityMinus",
    "FunctionOperator",
    "GraphJacobian",
]


class LinearOperator(abc.ABC):
    """A linear map ``A`` with ``mv(x) = A x`` and ``rmv(y) = Aᵀ y``.

    Vectors are tensors shaped like :attr:`like` (the state for a tensor state; one flat
    vector for a tuple state).  Products never write ``.grad`` of any tensor.
    """

    @property
    @abc.abstractmethod
    def like(self) -> Tensor:
        """A tensor of the shape, dtype and device of the vectors ``A`` acts on."""

    @abc.abstractmethod
    def mv(self, x: Tensor) -> Tensor:
        """``A x``.

        Args:
            x: A vector shaped like :attr:`like`.
        """

    @abc.abstractmethod
    def rmv(self, y: Tensor) -> Tensor:
        """``Aᵀ y``.

        Args:
            y: A vector shaped like :attr:`like`.
        """

    def mv_add(self, x: Tensor, c: Tensor, alpha: float = 1.0) -> Tensor:
        """``c + α A x`` (a new tensor; override it to fuse the sum into the product).

        Args:
            x: A vector shaped like :attr:`like`.
            c: The vector added, shaped like :attr:`like`.
            alpha: The scalar ``α``.
        """
        return torch.add(c, self.mv(x), alpha=alpha)

    def rmv_add(self, y: Tensor, c: Tensor, alpha: float = 1.0) -> Tensor:
        """``c + α Aᵀ y`` (a new tensor; override it to fuse the sum into the product).

        Args:
            y: A vector shaped like :attr:`like`.
            c: The vector added, shaped like :attr:`like`.
            alpha: The scalar ``α``.
        """
        return torch.add(c, self.rmv(y), alpha=alpha)

    @property
    def T(self) -> LinearOperator:
        """The transposed operator ``Aᵀ``."""
        return Transposed(self)

    def identity_minus(self) -> LinearOperator:
        """The operator ``I − A``."""
        return IdentityMinus(self)


class Transposed(LinearOperator):
    """``Aᵀ`` of an operator ``A``.

    Args:
        op: The operator ``A``.
    """

    def __init__(self, op: LinearOperator) -> None:
        self.op = op

    @property
    def like(self) -> Tensor:
        return self.op.like

    def mv(self, x: Tensor) -> Tensor:
        return self.op.rmv(x)

    def rmv(self, y: Tensor) -> Tensor:
        return self.op.mv(y)

    def mv_add(self, x: Tensor, c: Tensor, alpha: float = 1.0) -> Tensor:
        return self.op.rmv_add(x, c, alpha)

    def rmv_add(self, y: Tensor, c: Tensor, alpha: float = 1.0) -> Tensor:
        return self.op.mv_add(y, c, alpha)

    @property
    def T(self) -> LinearOperator:
        return self.op


class IdentityMinus(LinearOperator):
    """``I − A``; each product is one ``A.mv_add`` (``x − A x``).

    Args:
        op: The operator ``A``.
    """

    def __init__(self, op: LinearOperator) -> None:
        self.op = op

    @property
    def like(self) -> Tensor:
        return self.op.like

    def mv(self, x: Tensor) -> Tensor:
        return self.op.mv_add(x, x, -1.0)

    def rmv(self, y: Tensor) -> Tensor:
        return self.op.rmv_add(y, y, -1.0)

    @property
    def T(self) -> LinearOperator:
        """``(I − A)ᵀ = I − Aᵀ``."""
        return IdentityMinus(self.op.T)

    def identity_minus(self) -> LinearOperator:
        """``I − (I − A) = A``."""
        return self.op


class FunctionOperator(LinearOperator):
    """An operator from callables: ``mv`` and, optionally, ``rmv`` (else ``rmv`` raises).

    Args:
        mv: The product ``x ↦ A x``.
        like: A tensor of the shape, dtype and device of the vectors ``A`` acts on.
        rmv: The product ``y ↦ Aᵀ y``, or ``None`` (then ``rmv`` raises
            ``NotImplementedError``).

    Raises:
        ValueError: ``mv`` (or a given ``rmv``) is not callable.
    """

    def __init__(self, mv: Callable[[Tensor], Tensor], like: Tensor, rmv: Callable[[Tensor], Tensor] | None = None):
        if not callable(mv) or (rmv is not None and not callable(rmv)):
            raise ValueError("FunctionOperator: mv (and rmv, if given) must be callable")
        self._mv, self._rmv, self._like = mv, rmv, like

    @property
    def like(self) -> Tensor:
        return self._like

    def mv(self, x: Tensor) -> Tensor:
        return self._mv(x)

    def rmv(self, y: Tensor) -> Tensor:
        if self._rmv is None:
            raise NotImplementedError("this FunctionOperator was built without rmv (y -> A^T y)")
        return self._rmv(y)


def func_jacobian(
    fn: Callable[[State], State], state: State, flatten: Callable[[State], Tensor] = lambda s: s,
    unflatten: Callable[[Tensor], State] = lambda x: x,
) -> FunctionOperator:
    """``J = ∂fn/∂w`` at ``w = state`` by ``torch.func``: ``Jᵀy`` by one ``vjp`` of ``fn``, built
    here; ``J x`` by the transpose of that pullback (a ``vjp`` of it), built at the first
    ``mv``.  ``flatten`` and ``unflatten`` map a state to the vector ``J`` acts on and back
    (the identity for a tensor state)."""
    out, pullback = torch.func.vjp(fn, state)
    transposed: list[Callable] = []

    def mv(x: Tensor) -> Tensor:
        if not transposed:
            transposed.append(torch.func.vjp(pullback, torch.utils._pytree.tree_map(torch.zeros_like, out))[1])
        return flatten(transposed[0]((unflatten(x),))[0])

    return FunctionOperator(mv, flatten(state), lambda y: flatten(pullback(unflatten(y))[0]))


def _flat_cat(tensors: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


#: the autograd engine's entry point that ``torch.autograd.grad`` calls (None if absent)
_ENGINE_RUN = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None)


def _run_backward(outputs: tuple[Tensor, ...], cotangents: tuple[Tensor, ...], create: bool,
                  inputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of ``inputs`` (``None`` where unreached), the graph kept: the engine entry
    point without ``torch.autograd.grad``'s argument checks, or ``torch.autograd.grad``
    itself where a PyTorch version has no such entry point."""
    if _ENGINE_RUN is not None:
        return _ENGINE_RUN(outputs, cotangents, True, create, inputs, True, False)
    return torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, create_graph=create, allow_unused=True)


def walk(
    outputs: tuple[Tensor, ...], inputs: tuple[Tensor, ...], cotangents: tuple[Tensor, ...], create: bool = False,
    unreached: str = "zeros",
) -> tuple[Tensor | None, ...]:
    """``Σᵢ (∂outputsᵢ / ∂inputs)ᵀ cotangentsᵢ``: one walk of the recorded graph, which is kept.

    ``torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, allow_unused=True,
    create_graph=create)`` without its Python argument checks (the cotangents are shaped and
    typed like the outputs by construction; the engine still validates them): that wrapper
    costs about as much as a small product, and an adjoint solve makes one walk per
    iteration.  An input the outputs do not reach gets zeros (``unreached="zeros"``) or
    ``None`` (``"none"``).  The results are detached unless ``create``.
    """
    live = [i for i, o in enumerate(outputs) if o.requires_grad]
    if not live:  # the outputs do not depend on the inputs at all: J = 0
        return tuple(torch.zeros_like(z) if unreached == "zeros" else None for z in inputs)
    if len(live) < len(outputs):
        outputs, cotangents = tuple(outputs[i] for i in live), tuple(cotangents[i] for i in live)
    if create:
        with torch.enable_grad():
            grads = _run_backward(outputs, cotangents, True, inputs)
    else:
        grads = _run_backward(outputs, cotangents, False, inputs)
    if unreached != "zeros":
        return tuple(grads)
    return tuple(torch.zeros_like(z) if g is None else g for g, z in zip(grads, inputs))


class GraphJacobian(LinearOperator):
    """``J = ∂ out / ∂ w`` on a recorded graph ``out = Φ(w, ·)``.

    ``w`` (tensors that require grad) and ``out`` are states of one structure.  For a
    tensor state vectors are shaped like it; for a tuple state they are the flat
    concatenation of the parts.  Products run in the dtype of ``out`` (e.g. bfloat16 under
    autocast) and return the dtype of their argument.  The graph is kept for as many
    products as asked (``retain_graph``).

    Args:
        out: The recorded output ``Φ(w, ·)``, a tensor or a tuple of tensors.
        w: The input state, tensors that require grad, of the structure and shapes of ``out``.

    Raises:
        ValueError: ``out`` and ``w`` differ in structure or shapes.
    """

    def __init__(self, out: State, w: State) -> None:
        self.outs, self.ws = parts(out), parts(w)
        if len(self.outs) != len(self.ws) or any(o.shape != z.shape for o, z in zip(self.outs, self.ws)):
            raise ValueError(
                "GraphJacobian: the map's output "
                f"{[tuple(o.shape) for o in self.outs]} does not match the state {[tuple(z.shape) for z in self.ws]}"
            )
        self.single = isinstance(out, Tensor)
        self._like = self.outs[0].detach() if self.single else _flat_cat(tuple(o.detach() for o in self.outs))
        self._dual: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None
        #: a tensor state whose output depends on w: a product of the output's dtype is one engine call
        self._lean = self.single and self.outs[0].requires_grad

    @property
    def like(self) -> Tensor:
        return self._like

    def _split(self, x: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.single:
            return (x.to(like[0].dtype),)
        chunks = torch.split(x, [t.numel() for t in like])
        return tuple(c.reshape(t.shape).to(t.dtype) for c, t in zip(chunks, like))

    def _join(self, tensors: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        out = tensors[0] if self.single else _flat_cat(tensors)
        return out.to(dtype)

    def rmv(self, y: Tensor) -> Tensor:
        """``Jᵀ y``: one vector–Jacobian product on the recorded graph.

        Args:
            y: A vector shaped like :attr:`like`; the result has its dtype.
        """
        if self._lean and y.dtype == self._like.dtype:
            (g,) = _run_backward(self.outs, (y,), False, self.ws)
            return torch.zeros_like(y) if g is None else g
        return self._join(walk(self.outs, self.ws, self._split(y, self.outs)), y.dtype)

    def mv(self, x: Tensor) -> Tensor:
        """``J x``: the derivative of ``u ↦ Jᵀu`` (linear in ``u``) applied to ``x``.

        Args:
            x: A vector shaped like :attr:`like`; the result has its dtype.
        """
        if self._dual is None:
            with torch.enable_grad():
                dummies = tuple(torch.zeros_like(o, requires_grad=True) for o in self.outs)
                jtu = walk(self.outs, self.ws, dummies, create=True)
            self._dual = (jtu, dummies)
        jtu, dummies = self._dual
        return self._join(walk(jtu, dummies, self._split(x, self.ws)), x.dtype)
