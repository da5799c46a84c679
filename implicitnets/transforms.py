"""Whether a tensor is being traced by a ``torch.func`` transform, and by ``vmap`` in particular.

Inside ``vmap`` a tensor holds one problem of many: nothing may read its values on the host
(``float(t)``, ``bool(t)``, ``.item()``).  The solvers check :func:`under_vmap` and then run
without data-dependent control flow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["transforms_active", "under_vmap", "plain_value", "physical", "host_read", "read"]


def transforms_active(x: Tensor) -> bool:
    """Whether ``x`` is being traced by a ``torch.func`` transform (grad, vjp, jvp, vmap, ...)."""
    if torch.compiler.is_compiling():  # dynamo traces plain tensors here
        return False
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def under_vmap(x: Tensor) -> bool:
    """Whether ``x`` is batched by ``vmap`` at any of its transform levels."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return True
        x = functorch.get_unwrapped(x)
    return False


def plain_value(x: Tensor) -> Tensor:
    """The plain tensor under ``x``'s ``torch.func`` wrappers (detached; the same values).

    Raises ``NotImplementedError`` when ``x`` is batched by ``vmap``: its plain tensor holds
    every mapped problem at once.
    """
    functorch = torch._C._functorch
    x = x.detach()
    if torch.compiler.is_compiling():
        return x
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            raise NotImplementedError("this value cannot be read inside vmap: it differs between the mapped problems")
        x = functorch.get_unwrapped(x)
    return x


def physical(x: Tensor) -> Tensor:
    """The tensor under all of ``x``'s ``torch.func`` wrappers (detached): inside ``vmap``,
    the values of every mapped problem at once.  For reductions over all of them (a joint
    stopping test, a NaN check), which are then read on the host outside the transform."""
    functorch = torch._C._functorch
    x = x.detach()
    if torch.compiler.is_compiling():
        return x
    while functorch.is_functorch_wrapped_tensor(x):
        x = functorch.get_unwrapped(x)
    return x


def host_read(fn: Callable[P, R]) -> Callable[P, R]:
    """Mark ``fn`` as reading tensor values on the host (a stopping test, a NaN check,
    statistics): ``torch.compile`` runs it eagerly, one graph break without a warning,
    instead of tracing into the read."""
    return torch.compiler.disable(fn)


@host_read
def read(t: Tensor) -> float | list:
    """``t``'s values on the host (``t.tolist()``): the one kind of read the solvers make."""
    return t.tolist()
