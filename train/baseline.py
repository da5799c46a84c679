"""Explicit baselines of the same size as an implicit model, and the table that sets them side by side.

    size = matched_size(lambda width: count_parameters(MLP(784, width, 10)), target=199_010)
    print(comparison(summary))   # summary["baseline"] holds the baseline's summary
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["matched_size", "comparison"]


def matched_size(count: Callable[[int], int], target: int) -> int:
    """The size ``s >= 1`` (a width, a number of channels) whose parameter count ``count(s)`` is
    closest to ``target``; ``count`` must grow with ``s`` (doubling, then bisection)."""
    lo, hi = 1, 1
    while count(hi) < target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda size: abs(count(size) - target))


def comparison(summary: dict) -> str:
    """Two lines under a header: the model of ``summary`` beside ``summary["baseline"]``
    (keys ``model``, ``backward``, ``parameters``, ``test_acc``, ``train_acc``, ``seconds``,
    ``step_seconds``: the model's training steps alone), then the time ratios."""
    lines = [f"{'model':<18} {'parameters':>10}  test acc  train acc  seconds  model-step seconds"]
    for s in (summary, summary["baseline"]):
        name = s["model"] + (f" ({s['backward']})" if s["backward"] else "")
        lines.append(f"{name:<18} {s['parameters']:>10,}  {s['test_acc']:8.4f}  {s['train_acc']:9.4f}  "
                     f"{s['seconds']:7.1f}  {s['step_seconds']:18.1f}")
    base = summary["baseline"]
    if base["seconds"] and base["step_seconds"]:
        lines.append(f"time ratio {summary['model']} / {base['model']}: {summary['seconds'] / base['seconds']:.2f}x "
                     f"(whole run), {summary['step_seconds'] / base['step_seconds']:.2f}x (model steps)")
    return "\n".join(lines)
