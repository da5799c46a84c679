"""Learning-rate schedules: a linear warm-up, then a constant rate or a cosine decay to zero.

    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, lr=1e-3, total=5000, warmup=100, schedule="cosine")
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "learning_rate"]

SCHEDULES = ("cosine", "constant")


def learning_rate(step: int, *, lr: float, total: int, warmup: float = 0.0, schedule: str = "cosine") -> float:
    """The rate of optimiser step ``step`` (from 0) of ``total``: ``lr · (step + 1) / warmup``
    during the first ``warmup`` steps, then ``lr`` (``constant``) or ``lr · ½ (1 + cos(π p))``
    with ``p`` the fraction of the remaining steps done (``cosine``)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    progress = (step - warmup) / max(1.0, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
