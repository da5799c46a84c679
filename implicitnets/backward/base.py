"""The backward-mode protocol and the problem a backward mode is handed."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..bound_map import BoundMap
from ..maps.protocol import step_parts
from ..solvers import ForwardSolver, SolverStats
from ..state import State
from ..transforms import transforms_active
from .functional_step import FunctionalStep

__all__ = ["BackwardMode", "Problem", "transforms_active"]


@dataclass(frozen=True)
class Problem:
    """One fixed-point problem ``z = step(z, u)`` as handed to a backward mode.

    ``u`` is the (differentiable) injected input (a tensor or a tuple), ``z0`` the detached
    start, ``params`` the map's tensors as the step uses them and ``names`` their names in
    ``module`` (:func:`~implicitnets.backward.functional_step.map_tensors`), ``needs_grad``
    whether any gradient is wanted, ``module`` the map when it is an ``nn.Module``,
    ``adjoint_x0`` a warm start for an adjoint solve.

    Args:
        step: The map ``step(z, u) -> z``.
        u: The injected input, a tensor or a tuple of tensors.
        z0: The detached start of the forward solve.
        solver: The :class:`~implicitnets.ForwardSolver` to run.
        params: The map's tensors as the step uses them.
        needs_grad: Whether any gradient is wanted.
        module: The map when it is an ``nn.Module``, else ``None``.
        adjoint_x0: A warm start for an adjoint solve, or ``None``.
        names: The names of ``params`` in ``module``.
    """

    step: Callable[[State, State], State]
    u: State
    z0: State
    solver: ForwardSolver
    params: tuple[Tensor, ...]
    needs_grad: bool
    module: torch.nn.Module | None = None
    adjoint_x0: Tensor | None = None
    names: tuple[str, ...] = ()

    def map(self) -> BoundMap:
        """``z ↦ step(z, u)``, as the forward solver receives it."""
        return BoundMap(self.step, self.u, step_parts(self.step).owner)

    def functional(self) -> FunctionalStep:
        """The step as a pure function ``φ(w, u, params)``."""
        return FunctionalStep(self.step, self.module, self.names)


class BackwardMode(abc.ABC):
    """Decides how gradients flow through ``w* = Φ(w*, x; θ)``; subclass it for your own.

    ``run`` solves the problem with ``problem.solver`` and returns ``(w, stats)`` with ``w``
    differentiable with respect to ``problem.u`` and ``problem.params`` as the mode defines.
    """

    @abc.abstractmethod
    def run(self, problem: Problem) -> tuple[State, SolverStats]:
        """Solve ``problem`` and return the differentiable solution and its statistics.

        Args:
            problem: The :class:`Problem` to solve.

        Returns:
            ``(w, stats)``: the solution, differentiable with respect to ``problem.u`` and
            ``problem.params``, and the :class:`~implicitnets.SolverStats`.
        """

    def next_start(self, previous: SolverStats | None) -> Tensor | None:
        """The start of the backward solve of a layer's next call, from the statistics of its
        previous call (``Problem.adjoint_x0``); ``None`` (the default) starts from zero.

        Args:
            previous: The :class:`~implicitnets.SolverStats` of the layer's previous call, or
                ``None`` before the first.

        Returns:
            The start, or ``None``.
        """
        return None
