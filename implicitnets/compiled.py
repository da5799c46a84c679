"""The opt-in compiled path: a solver's loop run through ``torch.compile`` (inductor).

A solver given ``compile=Compile()`` runs the map evaluations between two stopping tests as
one compiled function: for :class:`~implicitnets.FixedPointIteration` the ``m`` steps
``z ← (1 − β) z + β Φ(z, u)`` of a chunk (``m = check_every``; the whole loop of
``max_iter`` steps when ``tol = 0``), for :class:`~implicitnets.linear.Neumann` the
``k`` steps ``v ← Jᵀ v + b`` (the whole loop when ``tol = 0``; one compiled step per
stopping test otherwise).  Inductor fuses the pointwise work of the map and of the
Jacobian products with the matrix products' inputs and outputs, and plans the buffers of
the unrolled loop so that iterates reuse memory instead of allocating at every step.  The
host reads the residual once per chunk, so with ``cuda_graphs=True`` a GPU replays each
chunk as a CUDA graph (``mode="reduce-overhead"``).  On the CPU the shipped maps' ``tanh``
stays ATen's kernel inside the compiled code (:mod:`implicitnets.maps.activation`): inductor's
own CPU ``tanh`` is several times slower.

Without the option the solvers run eagerly, as before.  Inside a ``torch.func`` transform
(``vmap``, ``grad``, ...) and inside an outer ``torch.compile`` the compiled path steps
aside and the eager loop runs (the outer compiler traces it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from .options import check_bool
from .transforms import transforms_active

__all__ = ["Compile", "use_compiled"]

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Compile:
    """Run a solver's loop through ``torch.compile`` (inductor); pass it as a solver's
    ``compile`` option, e.g. ``FixedPointIteration(20, tol=0.0, compile=Compile())``.

    The compiled loop computes what the eager loop computes, in the same order (values
    agree to rounding: about 1e-15 relative in float64).  The first call of each new shape
    (batch size, chunk length) compiles, which takes seconds; later calls reuse the code.

    Args:
        cuda_graphs: Keyword only.  Replay each compiled chunk as a CUDA graph
            (``torch.compile(mode="reduce-overhead")``; on CPU it changes nothing).
        dynamic: Keyword only.  ``torch.compile``'s ``dynamic``: ``None`` (recompile once
            for a new shape, then generalise), ``True`` (symbolic shapes from the start) or
            ``False`` (one compilation per shape).
        fullgraph: Keyword only.  Raise if the map cannot be traced into one graph (instead
            of running the untraceable part eagerly).

    Raises:
        ValueError: An option is of the wrong type.
    """

    cuda_graphs: bool = False
    dynamic: bool | None = None
    fullgraph: bool = False

    def __post_init__(self) -> None:
        check_bool("Compile", "cuda_graphs", self.cuda_graphs)
        if self.dynamic is not None:
            check_bool("Compile", "dynamic", self.dynamic)
        check_bool("Compile", "fullgraph", self.fullgraph)

    def __call__(self, fn: F) -> F:
        """``fn`` compiled with these options (one compiled wrapper per function and options)."""
        return _compiled(fn, self)


@functools.cache
def _compiled(fn: Callable, options: Compile) -> Callable:
    mode = "reduce-overhead" if options.cuda_graphs else None
    return torch.compile(fn, mode=mode, dynamic=options.dynamic, fullgraph=options.fullgraph)


def use_compiled(options: Compile | None, like: Tensor) -> bool:
    """Whether a solver given ``compile=options`` runs its compiled loop on tensors like
    ``like``: not without the option, not inside an outer ``torch.compile`` (which traces
    the eager loop) and not inside a ``torch.func`` transform."""
    return options is not None and not torch.compiler.is_compiling() and not transforms_active(like)
