"""Helpers shared by the phase configs (dataclasses parsed by `HfArgumentParser` from YAML and the command line)."""

from __future__ import annotations

import json
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
