"""Divergence detection on a residual trace (forward ``SolverStats.trace`` or any sequence).

A trace *diverges* when it holds NaN/Inf, or when its residual rises more than ``growth``
times above the smallest residual seen before, for ``patience`` consecutive entries.  A
stalled trace (residual flat above tolerance) is *not* divergence: that is
``SolverStats.converged = False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["DivergenceReport", "detect_divergence"]


@dataclass(frozen=True)
class DivergenceReport:
    """``diverged``: NaN/Inf or sustained growth; ``nonfinite``: a NaN/Inf entry was seen;
    ``index``: the entry where divergence was declared (None if not); ``max_growth``: the
    largest ratio ``trace[i] / min(trace[:i])`` (1.0 for a non-increasing trace).

    ``bool(report)`` is ``diverged``.

    Args:
        diverged: NaN/Inf or sustained growth was found.
        nonfinite: A NaN/Inf entry was seen.
        index: The entry where divergence was declared, or ``None``.
        max_growth: The largest ratio ``trace[i] / min(trace[:i])`` (``inf`` with a
            non-finite entry).
    """

    diverged: bool
    nonfinite: bool
    index: int | None
    max_growth: float

    def __bool__(self) -> bool:
        return self.diverged


def detect_divergence(
    trace: Sequence[float] | Tensor, *, growth: float = 10.0, patience: int = 1
) -> DivergenceReport:
    """Scan ``trace`` and report the first divergence (see the module docstring).

    Args:
        trace: The residuals, a sequence of floats or a tensor (flattened), e.g.
            ``SolverStats.trace``.
        growth: Keyword only.  The factor above the smallest earlier residual that counts
            as growth, a finite number >= 1.
        patience: Keyword only.  Consecutive growing entries that declare divergence, an
            int >= 1.

    Returns:
        The :class:`DivergenceReport`.

    Raises:
        ValueError: ``growth`` or ``patience`` is out of range.
    """
    if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth >= 1):
        raise ValueError(f"detect_divergence: growth must be a finite number >= 1, got {growth!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"detect_divergence: patience must be an int >= 1, got {patience!r}")
    values = trace.detach().flatten().tolist() if isinstance(trace, Tensor) else [float(t) for t in trace]
    best = math.inf
    max_growth = 1.0
    run = 0
    found: int | None = None
    for i, r in enumerate(values):
        if not math.isfinite(r):
            return DivergenceReport(True, True, i if found is None else found, math.inf)
        if best < math.inf:
            ratio = r / best if best > 0 else (math.inf if r > 0 else 1.0)
            max_growth = max(max_growth, ratio)
            run = run + 1 if ratio > growth else 0
            if run >= patience and found is None:
                found = i
        best = min(best, r)
    return DivergenceReport(found is not None, False, found, max_growth)
