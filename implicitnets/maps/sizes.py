"""Validation of the maps' layer sizes (widths, feature and channel counts)."""

from __future__ import annotations

__all__ = ["check_sizes"]


def check_sizes(name: str, **sizes: int) -> None:
    """``ValueError`` naming ``name`` and the size unless every size is an int >= 1."""
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {key} must be an int >= 1, got {value!r}")
