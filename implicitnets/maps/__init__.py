"""Fixed-point maps ``Φ(w, x; θ)``: any callable ``f(w, x) -> w`` works; these are shipped."""

from .gradient_step import GradientStep
from .graph import GraphMap, normalized_adjacency
from .tanh import TanhMap

__all__ = ["TanhMap", "GradientStep", "GraphMap", "normalized_adjacency"]
