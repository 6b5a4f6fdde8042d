"""Outside control of a running phase through files in a control folder: pause (checkpoint, then exit), progress.

A process that drives a phase from outside (the dashboard) sets `FORGE_CONTROL_DIR` to a folder and writes
`control.json` there (`{"action": "pause"}`). `ControlCallback`, which every `ForgeTrainer` attaches when that
variable is set, asks Trainer for a checkpoint at the end of the next step and, once it is written, exits the
process with `PAUSED_EXIT_CODE`; the recipe's own resume (`--resume`, `--resume_from_checkpoint`) continues from it.
Loops that are not Trainer loops (EvoMerge generations) call `pause_point()` where their state is saved. The
callback also writes `progress.json` (step, max_steps, run name) so the controller sees steps between log lines.
Hand-written: Trainer has no notion of an external pause request; the checkpoint itself is Trainer's.
"""

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

CONTROL_DIR_ENV = "FORGE_CONTROL_DIR"
CONTROL_FILE = "control.json"
PROGRESS_FILE = "progress.json"
PAUSED_EXIT_CODE = 75  # EX_TEMPFAIL: the run stopped on request and can be resumed


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary sibling and one rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(payload, default=str))
    os.replace(staging, path)


def control_dir() -> Path | None:
    """The control folder named by `FORGE_CONTROL_DIR`, or None when no controller is attached."""
    value = os.environ.get(CONTROL_DIR_ENV)
    return Path(value) if value else None


def requested_action(folder: Path | None) -> str | None:
    """The action a controller asked for in `<folder>/control.json` ('pause'), or None."""
    if folder is None or not (folder / CONTROL_FILE).exists():
        return None
    try:
        return json.loads((folder / CONTROL_FILE).read_text()).get("action")
    except (json.JSONDecodeError, OSError):  # being replaced this instant: read it next step
        return None


class PauseRequested(SystemExit):
    """Raised after the pause checkpoint is written; exits the recipe with `PAUSED_EXIT_CODE`."""

    def __init__(self, where: str) -> None:
        super().__init__(PAUSED_EXIT_CODE)
        self.where = where


def pause_point(where: str, **progress) -> None:
    """For loops that are not Trainer loops: call after the loop's state is saved; exits when a pause is asked."""
    folder = control_dir()
    if folder is None:
        return
    write_json_atomic(folder / PROGRESS_FILE, {"time": time.time(), **progress})
    if requested_action(folder) == "pause":
        write_json_atomic(folder / PROGRESS_FILE, {"time": time.time(), "paused_at": where, **progress})
        logger.warning("Paused on request after %s; resume with the recipe's --resume.", where)
        raise PauseRequested(where)


class ControlCallback(TrainerCallback):
    """Checkpoint-and-exit when `<folder>/control.json` asks for a pause; write `<folder>/progress.json`."""

    def __init__(self, folder: str | os.PathLike, progress_interval_s: float = 0.5) -> None:
        self.folder = Path(folder)
        self.progress_interval_s = progress_interval_s
        self._pausing = False
        self._last_write = 0.0

    @classmethod
    def from_env(cls) -> "ControlCallback | None":
        folder = control_dir()
        return cls(folder) if folder is not None else None

    def _progress(self, args, state, **extra) -> None:
        write_json_atomic(
            self.folder / PROGRESS_FILE,
            {"time": time.time(), "run_name": args.run_name, "step": state.global_step, "max_steps": state.max_steps,
             "epoch": state.epoch, **extra},
        )  # fmt: skip
        self._last_write = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._progress(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if requested_action(self.folder) == "pause" and not self._pausing:
            self._pausing = True
            control.should_save = True  # Trainer writes the checkpoint right after this step's callbacks
            logger.warning("Pause requested: checkpointing at step %d, then exiting.", state.global_step)
        elif state.is_world_process_zero and time.monotonic() - self._last_write >= self.progress_interval_s:
            self._progress(args, state)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self._pausing:
            where = f"{args.output_dir}/checkpoint-{state.global_step}"
            if state.is_world_process_zero:
                self._progress(args, state, paused_at=where)
            raise PauseRequested(where)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._progress(args, state, finished=True)


__all__ = [
    "CONTROL_DIR_ENV",
    "CONTROL_FILE",
    "PAUSED_EXIT_CODE",
    "PROGRESS_FILE",
    "ControlCallback",
    "PauseRequested",
    "pause_point",
    "requested_action",
    "write_json_atomic",
]
