"""Fixed-point maps ``Φ(w, x; θ)``: any callable ``f(w, x) -> w`` works; these are shipped."""

from .gradient_step import GradientStep
from .tanh import TanhMap

__all__ = ["TanhMap", "GradientStep"]
