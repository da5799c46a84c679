"""Fixed-point maps ``Φ(w, x; θ)``: any callable ``f(w, x) -> w`` works; these are shipped.

:class:`Map` is their base class and the protocol a map of your own may follow
(:mod:`implicitnets.maps.protocol`: ``inject``, ``step`` and the optional parts).

Each shipped map has ``lipschitz_bound()`` (the global Lipschitz constant of Φ(·, x) its
parametrization implies, ``None`` when it implies none) and ``jacobian(w, u, out)`` (the
closed-form ``J = ∂₁Φ`` as a :class:`~implicitnets.LinearOperator`, which AID and the
diagnostics use in place of autograd products).  :class:`MonotoneMap` is the protocol of the
monotone maps (monDEQ: ``I − W ⪰ m I``, a unique equilibrium without a contraction) that the
operator-splitting solvers need; :class:`MonotoneFC` and :class:`MonotoneConv` implement it.
"""

from .conv import ConvCell
from .gradient_step import GradientStep
from .graph import GraphMap, normalized_adjacency
from .monotone import MonotoneMap
from .monotone_conv import MonotoneConv
from .monotone_fc import MonotoneFC
from .protocol import Map, MapParts, parts_of
from .tanh import TanhMap

__all__ = [
    "Map",
    "MapParts",
    "parts_of",
    "TanhMap",
    "ConvCell",
    "GradientStep",
    "GraphMap",
    "normalized_adjacency",
    "MonotoneMap",
    "MonotoneFC",
    "MonotoneConv",
]
