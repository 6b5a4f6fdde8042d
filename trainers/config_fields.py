"""Helpers shared by the phase configs (dataclasses parsed by `HfArgumentParser` from YAML and the command line)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def json_field(value: Any, owner: str, name: str) -> Any:
    """A structured field as given: YAML already yields mappings and lists, the command line a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{owner}.{name} is not valid JSON ({error}). Fix: write it as a YAML mapping or list in the config "
                "file, or quote valid JSON on the command line."
            ) from None
    return value


_SIMPLE = (bool, int, float, str, list, dict)


def check_field_types(config: Any, owner: str, names: Sequence[str]) -> None:
    """Refuse a value of the wrong type in the named dataclass fields, naming the field, the type and the fix.

    YAML values reach a config without argparse's conversion (a list where a number belongs, a string for a float),
    and would otherwise fail later in a comparison that names nothing. Only plain annotations are checked (`int`,
    `float`, `str`, `bool`, `list`, `dict` and unions of them with None); an int is a valid float, a bool is not a
    number.
    """
    import types
    import typing

    hints = typing.get_type_hints(type(config))
    for name in names:
        hint = hints.get(name)
        options = (
            typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else (hint,)
        )
        options = tuple(typing.get_origin(o) or o for o in options)
        if not options or not all(o in _SIMPLE or o is type(None) for o in options):
            continue
        value = getattr(config, name)
        allowed = set(options) | ({int} if float in options else set())
        if isinstance(value, bool):
            ok = bool in allowed
        else:
            ok = type(value) in allowed or (value is None and type(None) in allowed)
        if not ok:
            expected = " or ".join(sorted(getattr(o, "__name__", str(o)) for o in set(options)))
            raise ValueError(
                f"{owner}.{name} is {value!r} ({type(value).__name__}); it must be {expected}. Fix: set {name} to a "
                f"value of that type in the YAML file or on the command line."
            )


def check_own_field_types(config: Any, owner: str) -> None:
    """`check_field_types` over a phase config's own fields (those `TrainingArguments` does not define)."""
    import dataclasses

    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    check_field_types(config, owner, [f.name for f in dataclasses.fields(config) if f.name not in inherited])


def parse_recipe_config(parser, args: Sequence[str] | None = None) -> tuple:
    """`parser.parse_args_and_config(args)`, with a malformed YAML file reported by file, line and fix."""
    import yaml

    try:
        return parser.parse_args_and_config(args=args)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "the config"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(
            f"{where}: malformed YAML ({problem}). Fix: correct the syntax there (an unclosed bracket or quote, "
            "a tab, a missing ': '); the shipped recipes/configs/*_tiny.yaml show the expected layout."
        ) from None
