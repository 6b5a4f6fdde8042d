"""The merge-method registry: a plain dict from name to a (parameterised) method instance, and `get()`."""

from __future__ import annotations

import difflib

from .base import MergeMethod
from .dfs import DFSMerge
from .franken import FrankenMerge
from .linear import LinearMerge
from .slerp import SlerpMerge
from .task_arithmetic import TASK_ARITHMETIC_VARIANTS

MERGE_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        LinearMerge(),
        SlerpMerge(),
        *TASK_ARITHMETIC_VARIANTS,
        FrankenMerge(),
        DFSMerge(),
        DFSMerge("passthrough", "mergekit's layer stacking (slices); the same as dfs."),
    )
}


def get_merge_method(name: str) -> MergeMethod:
    """The registered method `name`; an unknown name raises a ValueError listing the known ones."""
    if name not in MERGE_METHODS:
        close = difflib.get_close_matches(str(name), MERGE_METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown merge method {name!r}.{hint} Known methods: {', '.join(sorted(MERGE_METHODS))}.")
    return MERGE_METHODS[name]


__all__ = ["MERGE_METHODS", "get_merge_method"]
