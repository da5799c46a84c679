"""Equilibrium classifiers for MNIST-sized images and explicit baselines of the same size.

* :class:`FCEquilibrium` — the paper's ``w = tanh(A w + B x + c)``, linear classifier on ``w``.
* :class:`ConvEquilibrium` — one weight-tied conv cell ``z = relu(A ⋆ z + B ⋆ x + b)`` with
  ``‖A ⋆ ·‖₂ ≤ γ`` (operator norm), pooled linear classifier on ``z``.
* :class:`MonotoneEquilibrium`, :class:`MonotoneConvEquilibrium` — monDEQ's ``z = ReLU(W z + U x + b)``
  with ``I − W ⪰ m I``: a unique equilibrium without a contraction, solved by operator splitting.
* :class:`MLP`, :class:`CNN` — explicit networks with about the same parameter counts.
"""

from .baselines import CNN, MLP
from .conv import ConvCell, ConvEquilibrium
from .fc import FCEquilibrium
from .monotone import MonotoneConvEquilibrium, MonotoneEquilibrium

__all__ = [
    "FCEquilibrium",
    "ConvEquilibrium",
    "ConvCell",
    "MonotoneEquilibrium",
    "MonotoneConvEquilibrium",
    "MLP",
    "CNN",
    "count_parameters",
]


def count_parameters(model) -> int:
    """Number of trainable scalars of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
