"""Command-line options from a configuration dataclass: one ``--flag`` per field.

Each field's default is the option's default and its type the option's type; booleans get
``--flag / --no-flag``.  A *preset* field (``--preset NAME`` or ``--quick``) swaps in other
defaults before parsing, so options given explicitly still override it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

__all__ = ["config_parser", "parse_config"]

T = TypeVar("T")


def config_parser(cls: type, prog: str, description: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one option per field of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(cls):
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    return parser


def parse_config(
    cls: type[T],
    argv: list[str] | None,
    *,
    prog: str,
    description: str | None,
    presets: dict[str, dict[str, Any]] | None = None,
    preset_field: str = "preset",
) -> T:
    """Parse ``argv`` into ``cls``.  With ``presets``, the value of ``preset_field`` selects
    the defaults to use (a string field names a preset; a bool field selects ``presets[field]``
    when true); an unknown preset name is a usage error."""
    parser = config_parser(cls, prog, description)
    if presets:
        chosen = getattr(parser.parse_known_args(argv)[0], preset_field)
        if chosen is True:
            chosen = preset_field
        if chosen:
            if chosen not in presets:
                parser.error(f"unknown --{preset_field} {chosen!r}; choose one of {', '.join(presets)}")
            parser.set_defaults(**presets[chosen])
    return cls(**vars(parser.parse_args(argv)))
