"""Hypergradient descent: ``λ_{k+1} = P(λ_k − lr · ∇f(λ_k))`` with any method, warm-started.

Each outer step calls ``method.hypergradient(problem, λ_k, previous)`` with the previous
:class:`Hypergradient` as the start, so the inner state (and the adjoint, the tangents or
the tolerance schedule, whatever the method carries) continues from step to step: RTHO
and HOAG are this loop with their method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._state import Hparams, as_hparams, check_steps
from .base import Bilevel, Hypergradient, HypergradientMethod, Start

__all__ = ["optimize", "Trajectory"]


@dataclass
class Trajectory:
    """Final ``λ`` and last :class:`Hypergradient`; per step, ``E(w_k, λ_k)`` at the inner
    state the method reached and its inner / backward iteration counts (when it reports them).

    Args:
        hparams: The final λ.
        last: The last :class:`Hypergradient`.
        outer_losses: ``E(w_k, λ_k)`` per step.
        inner_iterations: Inner iterations per step (``None`` when not reported).
        backward_iterations: Backward (adjoint) iterations per step (``None`` when not
            reported).
    """

    hparams: Hparams
    last: Hypergradient
    outer_losses: list[float] = field(default_factory=list)
    inner_iterations: list[int | None] = field(default_factory=list)
    backward_iterations: list[int | None] = field(default_factory=list)


def optimize(
    method: HypergradientMethod,
    problem: Bilevel,
    hparams: Tensor | Sequence[Tensor],
    start: Start,
    steps: int,
    lr: float,
    project: Callable[[Hparams], Sequence[Tensor]] | None = None,
    callback: Callable[[int, Hparams, Hypergradient], None] | None = None,
) -> Trajectory:
    """``steps`` hypergradient-descent steps of size ``lr``; inputs are not modified.

    ``project`` maps λ back to its feasible set after each step (e.g. a clamp);
    ``callback(k, λ_{k+1}, result_k)`` runs after each step.

    Args:
        method: The :class:`HypergradientMethod`.
        problem: The :class:`Bilevel` problem.
        hparams: The initial λ, a tensor or a sequence of tensors (copied, not modified).
        start: The inner start of the first step: a state or a :class:`Hypergradient`.
        steps: Number of outer steps, an int >= 1.
        lr: The outer step size, a finite number > 0.
        project: A callable ``λ -> λ`` applied after each step, or ``None``.
        callback: A callable ``callback(k, λ_{k+1}, result_k)``, or ``None``.

    Returns:
        The :class:`Trajectory`.

    Raises:
        ValueError: An argument is out of range or of the wrong type.
    """
    if not isinstance(method, HypergradientMethod):
        raise ValueError(f"optimize: method must be a hypergrad.HypergradientMethod, got {method!r}")
    check_steps("optimize", "steps", steps, minimum=1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"optimize: lr must be a finite number > 0, got {lr!r}")
    if project is not None and not callable(project):
        raise ValueError("optimize: project must be None or a callable hparams -> hparams")
    hp = tuple(h.detach().clone() for h in as_hparams(hparams))
    trajectory: Trajectory | None = None
    current: Start = start
    for k in range(steps):
        result = method.hypergradient(problem, hp, current)
        with torch.no_grad():
            loss = float(problem.outer(result.w, hp))
        hp = tuple(h - lr * g for h, g in zip(hp, result.grads))
        if project is not None:
            hp = tuple(h.detach() for h in as_hparams(project(hp)))
        if trajectory is None:
            trajectory = Trajectory(hp, result)
        trajectory.hparams, trajectory.last = hp, result
        trajectory.outer_losses.append(loss)
        trajectory.inner_iterations.append(None if result.stats is None else result.stats.iterations)
        trajectory.backward_iterations.append(None if result.stats is None else result.stats.backward.iterations)
        if callback is not None:
            callback(k, hp, result)
        current = result
    assert trajectory is not None
    return trajectory
