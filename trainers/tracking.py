"""Experiment tracking for what Trainer's `report_to` does not cover: loops that are not Trainer loops, and alerts.

Trainer phases log through `report_to` (trackio: local SQLite under `TRACKIO_DIR`; wandb offline by default).
`LoopTracker` sends a non-Trainer loop's metrics (EvoMerge generations) to the same backends with the same
`init`/`log`/`finish` calls Trainer's integrations make, so one project holds every phase. `send_alert` forwards a
health monitor's warning to trackio's alerts table when a trackio run is active (the dashboard shows them).
"""

import importlib
import os
import sys
from collections.abc import Mapping, Sequence

from transformers.utils import logging

logger = logging.get_logger(__name__)

LOOP_BACKENDS = ("trackio", "wandb")


def requested_backends(report_to: str | Sequence[str] | None, strict: bool = False) -> list[str]:
    """The loop backends named in a `report_to` value ('none', 'trackio', ['trackio', 'wandb'], ...); `strict`
    refuses other names (configs of non-Trainer phases, where nothing else would read them), else they are left to
    Trainer's own integrations."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    unknown = [name for name in names if name not in (*LOOP_BACKENDS, "none", "all")]
    if strict and unknown:
        raise ValueError(f"report_to={names} names unknown backends {unknown}. Fix: use trackio, wandb or none.")
    if "all" in names:
        return [name for name in LOOP_BACKENDS if importlib.util.find_spec(name) is not None]
    return [name for name in names if name in LOOP_BACKENDS]


class LoopTracker:
    """Logs one loop as one run in each requested backend (`trackio`, `wandb`); a no-op when none is requested."""

    def __init__(self, report_to, *, project: str, run_name: str, config: Mapping | None = None) -> None:
        self.backends = []
        for name in requested_backends(report_to):
            if name == "wandb":
                os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user chose a mode
            module = importlib.import_module(name)
            module.init(project=project, name=run_name, config=dict(config or {}), resume="allow")
            self.backends.append(module)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for module in self.backends:
            module.log(dict(metrics), step=step)

    def finish(self) -> None:
        for module in self.backends:
            module.finish()
        self.backends = []


def send_alert(title: str, text: str, step: int | None = None) -> None:
    """Record a monitor warning as a trackio alert when a trackio run is active in this process (else nothing)."""
    trackio = sys.modules.get("trackio")
    if trackio is None or trackio.context_vars.current_run.get() is None:
        return
    trackio.alert(title=title, text=text if step is None else f"step {step}: {text}", level=trackio.AlertLevel.WARN)


__all__ = ["LOOP_BACKENDS", "LoopTracker", "requested_backends", "send_alert"]
