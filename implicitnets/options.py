"""Validation of options: the one place that checks the numbers, flags and objects an option
dataclass (a solver, a linear solver, a backward mode, a parametrization) is given.

Each check raises ``ValueError`` naming the owner, the option, what it must be and what it
got.  ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math

__all__ = ["check_int", "check_real", "check_bool", "check_instance"]


def check_int(owner: str, option: str, value: object, minimum: int = 1, *, optional: bool = False) -> None:
    """``value`` is an int ``>= minimum`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "None or an int" if optional else "an int"
        raise ValueError(f"{owner}: {option} must be {what} >= {minimum}, got {value!r}")


def check_real(
    owner: str,
    option: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``value`` is a finite real number within the bounds given (open or closed)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{owner}: {option} must be {_describe(low, high, low_open, high_open)}, got {value!r}")


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_bool(owner: str, option: str, value: object) -> None:
    """``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {option} must be a bool, got {value!r}")


def check_instance(owner: str, option: str, value: object, kind: type, example: str) -> None:
    """``value`` is an instance of ``kind`` (``example`` shows one, e.g. ``"Warn(), Raise()"``)."""
    if not isinstance(value, kind):
        raise ValueError(
            f"{owner}: {option} must be an {kind.__module__.split('.')[0]}.{kind.__qualname__} "
            f"(e.g. {example}), got {value!r}"
        )
