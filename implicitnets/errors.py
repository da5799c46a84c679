"""Exception and warning types raised by implicitnets.

Every failure of a solve is either reported in the returned statistics (and warned about
with :class:`ConvergenceWarning`) or raised as one of the errors below; nothing fails
silently.
"""

from __future__ import annotations

__all__ = ["ConvergenceWarning", "ConvergenceError", "NonFiniteError"]


class ConvergenceWarning(UserWarning):
    """A forward or backward solve stopped before reaching its tolerance."""


class ConvergenceError(RuntimeError):
    """A solve did not reach its tolerance and the caller asked for an exception."""


class NonFiniteError(FloatingPointError):
    """NaN or Inf met in an input, in a map's output, or in a linear-solver iterate."""
