"""Agent Forge's metrics as local `evaluate` modules, loadable offline with `evaluate.load(<folder>)`.

    from evaluation.evaluate_metrics import load_metric, metric_path

    load_metric("forge_accuracy").compute(predictions=[0, 1], references=[0, 0])  # {"accuracy": 0.5}
    evaluate.load(metric_path("forge_pass_at_k")).compute(predictions=[[True, False]], k=[1])

`evaluate.load("accuracy")` needs the Hub (the metric scripts live there); these folders hold the scripts the
harness itself uses, so every number it reports goes through the same code a user can load.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("forge_accuracy", "forge_exact_match", "forge_pass_at_k")


def metric_path(name: str) -> str:
    """The folder of local metric module `name`, for `evaluate.load(path)`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric module {name!r}; known modules: {', '.join(METRIC_NAMES)}.")
    return str(METRICS_DIR / name)


@functools.cache
def load_metric(name: str) -> Any:
    """The loaded `evaluate` module `name` (kept in memory, no cache files); loaded once per process (slow import)."""
    import evaluate

    return evaluate.load(metric_path(name), keep_in_memory=True)


__all__ = ["METRICS_DIR", "METRIC_NAMES", "load_metric", "metric_path"]
