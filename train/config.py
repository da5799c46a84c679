"""Command-line options from a configuration dataclass: one ``--flag`` per field.

Each field's default is the option's default, its type the option's type and its trailing
comment (``threads: int = 1  # CPU cores ...``) the option's help; booleans get
``--flag / --no-flag``.  A *preset* field (``--preset NAME`` or ``--quick``) swaps in other
defaults before parsing, so options given explicitly still override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
from typing import Any, TypeVar

__all__ = ["config_parser", "parse_config", "field_comments", "check_choices"]

T = TypeVar("T")


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each ``name: type = default`` line in the source of ``cls``
    (empty if the source is not available)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    line: list[tokenize.TokenInfo] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            code = [t for t in line if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
            if len(code) > 2 and code[0].type == tokenize.NAME and code[1].string == ":" \
                    and code[-1].type == tokenize.COMMENT:
                comments[code[0].string] = code[-1].string.lstrip("#").strip()
            line = []
        else:
            line.append(token)
    return comments


def config_parser(cls: type, prog: str, description: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one option per field of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = field_comments(cls)
    for field in dataclasses.fields(cls):
        flag = f"--{field.name.replace('_', '-')}"
        comment = comments.get(field.name, "").replace("%", "%%")
        help_text = f"{comment} (default: %(default)s)" if comment else "default: %(default)s"
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default, help=help_text)
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


def check_choices(cfg: Any, choices: dict[str, tuple], at_least_one: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming the option if a field of ``cfg`` is not one of its
    ``choices`` or a field named in ``at_least_one`` is below 1."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                             f"got {getattr(cfg, name)!r}")
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
