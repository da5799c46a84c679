"""The map step as a pure function ``φ(w, u, P)`` of the state, the injected input and the
map's tensors.

The implicit autograd functions (:mod:`implicitnets.backward.implicit`) take the map's
tensors ``P`` as explicit inputs, so that reverse mode, forward mode and the ``torch.func``
transforms all see them.  ``P`` holds every floating-point parameter of an ``nn.Module`` map
as the map uses it: the *effective* tensor of a parametrized weight (e.g. ``A.weight`` under
:func:`~implicitnets.spectral_norm`, evaluated once per solve with its graph to the trainable
``original``), the parameter itself otherwise.  Evaluating ``φ`` substitutes ``P`` into the
module by name (``torch.func.functional_call``'s mechanism; a parametrized name takes the
given tensor as is), so a solve, its adjoint and their derivatives all use the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn
from torch.nn.utils import parametrize, stateless

from ..state import State

__all__ = ["FunctionalStep", "map_tensors"]


def map_tensors(module: nn.Module | None) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """Names and values of the tensors ``P`` of a map (empty for a plain callable).

    Call it inside ``parametrize.cached()`` so that a parametrized weight is computed once.
    """
    if module is None:
        return (), ()
    names: list[str] = []
    tensors: list[Tensor] = []
    for prefix, sub in module.named_modules():
        here = f"{prefix}." if prefix else ""
        if parametrize.is_parametrized(sub):
            for name in sub.parametrizations:
                value = getattr(sub, name)
                if isinstance(value, Tensor) and value.is_floating_point():
                    names.append(here + name)
                    tensors.append(value)
        if "parametrizations" in prefix.split("."):
            continue  # a parametrization's ``original``: the effective tensor above stands for it
        for name, p in sub.named_parameters(recurse=False):
            if p.is_floating_point():
                names.append(here + name)
                tensors.append(p)
    return tuple(names), tuple(tensors)


class FunctionalStep:
    """``φ(w, u, P) = step(w, u)`` with the map's tensors replaced by ``P``.

    ``step`` is the map's step (a bound method of ``module``, or any callable when
    ``module`` is ``None``), ``names`` the names of ``P`` in ``module`` (:func:`map_tensors`).
    """

    def __init__(self, step: Callable[[State, State], State], module: nn.Module | None, names: tuple[str, ...]):
        self.step, self.module, self.names = step, module, names
        self._parametrized: list[tuple[nn.Module, str] | None] | None = None

    @property
    def parametrized(self) -> list[tuple[nn.Module, str] | None]:
        """Per name: the (module, attribute) of a parametrized tensor, else ``None``."""
        if self._parametrized is None:
            found: list[tuple[nn.Module, str] | None] = []
            for name in self.names if self.module is not None else ():
                path, _, attr = name.rpartition(".")
                sub = self.module.get_submodule(path)
                found.append((sub, attr) if parametrize.is_parametrized(sub, attr) else None)
            self._parametrized = found
        return self._parametrized

    @contextlib.contextmanager
    def substituted(self, params: tuple[Tensor, ...]) -> Iterator[None]:
        """Within this context the module computes with ``params`` in place of its tensors.

        A parametrized tensor is substituted as the value of its parametrization (placed in
        ``parametrize.cached()``'s cache, so the parametrization is not evaluated), any other
        tensor through ``torch.func.functional_call``'s mechanism.
        """
        if self.module is None or not self.names:
            yield
            return
        plain = {n: t for n, t, where in zip(self.names, params, self.parametrized) if where is None}
        values = [((id(where[0]), where[1]), t) for t, where in zip(params, self.parametrized) if where is not None]
        with parametrize.cached():
            cache = parametrize._cache
            before = [cache.get(key) for key, _ in values]
            cache.update(values)
            try:
                if plain:
                    with stateless._reparametrize_module(self.module, plain):
                        yield
                else:
                    yield
            finally:
                for (key, _), old in zip(values, before):
                    if old is None:
                        cache.pop(key, None)
                    else:
                        cache[key] = old

    def __call__(self, w: State, u: State, params: tuple[Tensor, ...]) -> State:
        with self.substituted(params):
            return self.step(w, u)
