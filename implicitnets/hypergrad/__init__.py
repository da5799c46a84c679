"""Bilevel hypergradients: ``min_λ f(λ) = E(w(λ), λ)``, ``w(λ) = Φ(w(λ), λ)``.

Every method takes the inner map ``phi(w, λ)`` (e.g. :class:`GradientStep` of an inner
loss), the outer objective ``outer_loss(w, λ)``, an inner iterate and the hyperparameters
(a tensor or a tuple of tensors), and returns ``∇f(λ)`` as a tuple of tensors shaped like
the hyperparameters.  Nothing is written to ``.grad``.

* :class:`ReverseITD` / :func:`reverse_itd` — reverse mode through t inner steps (optionally
  truncated to the last K).
* :class:`ForwardITD` / :func:`forward_itd` — forward mode, ``Z_t = A_t Z_{t−1} + B_t``
  (Franceschi et al. 2017), memory independent of t.
* :class:`RTHO` — real-time HO: hyper-steps during one inner run.
* :class:`AID` / :func:`aid` — implicit differentiation with an :mod:`implicitnets.linear`
  solver: ``(I − ∂₁Φᵀ) v = ∇₁E``, ``∇f = ∇₂E + ∂₂Φᵀ v``.
* :class:`SID` — stochastic AID with minibatch inner and linear solves (Grazzi et al. 2021).
* :class:`HOAG` — outer loop with summable inner/linear tolerances (Pedregosa 2016).
* :class:`GradientDescent`, :class:`HeavyBall` — differentiable inner optimisers whose lr and
  momentum may be hyperparameters; :func:`unroll` keeps their graph.
* :func:`ridge_hypergradient`, :func:`dense_hypergradient` — exact references.
"""

from ._state import Hparams, InnerMap, OuterLoss, State
from .aid import AID, AIDResult, aid
from .exact import (
    dense_hypergradient,
    ridge_hypergradient,
    ridge_inner_loss,
    ridge_lipschitz,
    ridge_outer_loss,
    ridge_solution,
)
from .forward_itd import ForwardITD, forward_itd
from .gradient_step import GradientStep
from .hoag import HOAG, GeometricSchedule, HOAGResult, HOAGStep, PowerSchedule
from .inner import iterate
from .itd import ReverseITD, reverse_itd
from .optimizers import GradientDescent, HeavyBall, OnParams, unroll
from .rtho import RTHO, RTHOResult, rtho
from .sid import SID, DecayingStep, SIDResult, StochasticMap

__all__ = [
    "State",
    "Hparams",
    "InnerMap",
    "OuterLoss",
    "GradientStep",
    "iterate",
    "ReverseITD",
    "reverse_itd",
    "ForwardITD",
    "forward_itd",
    "RTHO",
    "RTHOResult",
    "rtho",
    "AID",
    "AIDResult",
    "aid",
    "SID",
    "SIDResult",
    "DecayingStep",
    "StochasticMap",
    "HOAG",
    "HOAGResult",
    "HOAGStep",
    "PowerSchedule",
    "GeometricSchedule",
    "GradientDescent",
    "HeavyBall",
    "OnParams",
    "unroll",
    "ridge_inner_loss",
    "ridge_outer_loss",
    "ridge_solution",
    "ridge_hypergradient",
    "ridge_lipschitz",
    "dense_hypergradient",
]
