"""Bilevel hypergradients: ``min_λ f(λ) = E(w(λ), λ)``, ``w(λ) = Φ(w(λ), λ)``.

A :class:`Bilevel` problem holds the inner map Φ (e.g. :class:`~implicitnets.maps.GradientStep`
of an inner loss) and the outer objective E; the hyperparameters λ are a tuple of tensors,
the inner state a tensor or a tuple of tensors.  Every method is a
:class:`HypergradientMethod` with one verb, ``method.hypergradient(problem, λ, start)``,
returning a :class:`Hypergradient` (the gradient, the inner state reached, the adjoint and
what the next call can warm-start from — pass the result back as ``start``):

* :class:`Backprop` ``(solver, backward)`` — reverse mode through the core's fixed-point
  machinery: ``backward=ITD()`` (reverse ITD through the t solver steps; ``truncate=K``),
  ``AID(linear_solver)`` (AID-FP / CG / NormalCG / GMRES / Exact at ``w_t``) or
  ``JacobianFree()``.  The same ``ITD``, ``AID`` and forward solvers as the layers.
* :class:`ForwardITD` — forward mode, ``Z_t = A_t Z_{t−1} + B_t`` (Franceschi et al. 2017),
  memory independent of t.
* :class:`RTHO` — real-time HO: the forward-mode run continues across calls.
* :class:`SID` — stochastic AID with minibatch inner and linear solves (Grazzi et al. 2021).
* :class:`HOAG` — AID with summable inner/linear tolerances and warm starts (Pedregosa 2016).

:func:`optimize` runs hypergradient descent with any method.  :class:`GradientDescent`,
:class:`HeavyBall` turn an inner loss into an inner map whose lr and momentum may be
hyperparameters.  :func:`ridge_hypergradient`, :func:`dense_hypergradient` are exact
references.  Nothing is written to ``.grad``.
"""

from ._state import Hparams, InnerMap, OuterLoss
from .backprop import Backprop
from .base import Bilevel, Hypergradient, HypergradientMethod
from .exact import (
    dense_hypergradient,
    ridge_hypergradient,
    ridge_inner_loss,
    ridge_lipschitz,
    ridge_outer_loss,
    ridge_solution,
)
from .forward_itd import ForwardITD
from .hoag import HOAG, GeometricSchedule, PowerSchedule
from .optimize import Trajectory, optimize
from .optimizers import GradientDescent, HeavyBall, OnParams
from .rtho import RTHO
from .sid import SID, DecayingStep

__all__ = [
    "Bilevel",
    "Hypergradient",
    "HypergradientMethod",
    "Hparams",
    "InnerMap",
    "OuterLoss",
    "Backprop",
    "ForwardITD",
    "RTHO",
    "SID",
    "DecayingStep",
    "HOAG",
    "PowerSchedule",
    "GeometricSchedule",
    "optimize",
    "Trajectory",
    "GradientDescent",
    "HeavyBall",
    "OnParams",
    "ridge_inner_loss",
    "ridge_outer_loss",
    "ridge_solution",
    "ridge_hypergradient",
    "ridge_lipschitz",
    "dense_hypergradient",
]
