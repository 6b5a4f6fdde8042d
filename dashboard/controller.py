"""The control side of the dashboard: one phase at a time in a child process, its config, and the event log.

`Controller` writes the phase's effective config (the preset YAML, then the user's validated fields, then the run
folder's paths and trackio tracking) to `<run>/.forge_control/phaseN.yaml` and runs `python -m recipes.phaseN
--config that.yaml` in its own process group, with `FORGE_CONTROL_DIR` (pause requests, progress; see
`trainers/control.py`) and `TRACKIO_DIR=<run>/trackio`. Pause writes the request file; the phase checkpoints and
exits with `PAUSED_EXIT_CODE`; resume starts the recipe again with its own resume fields. `EventHub` polls the child,
the progress file and the trackio database and turns changes into an ordered event log for the stream.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path

import yaml

from .phases import PHASES, TRACKING, get_phase
from .runfolder import TrackioReader, read_report

# Mirrors trainers.control (this package must not import trainers at start-up: torch takes seconds to load).
CONTROL_DIRNAME = ".forge_control"
CONTROL_FILE = "control.json"
PROGRESS_FILE = "progress.json"
PAUSED_EXIT_CODE = 75
PIPELINE_STATE_FILE = "pipeline_state.json"
LOG_TAIL_CHARS = 4000
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configure request the phase's config class refuses; `field` names the offending field when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Conflict(RuntimeError):
    """A control request that does not fit the phase's current state (HTTP 409)."""


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def _check_type(name: str, annotation, value) -> None:
    """Refuse a value whose JSON type cannot be the field's annotated type (int, float, bool, str, list, dict)."""
    if isinstance(annotation, str) or annotation is typing.Any:
        return
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if typing.get_origin(annotation) is typing.Union:
        options = typing.get_args(annotation)
    accepted = []
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None):
            accepted.append(type(None))
        elif origin in (int, float, bool, str, list, dict):
            accepted.append(origin)
        else:
            return  # enums, literals, unions of classes: the config class checks them itself
    if float in accepted:
        accepted.append(int)
    if isinstance(value, bool) and bool not in accepted:
        raise ConfigError(f"{name}: expected {'/'.join(t.__name__ for t in accepted)}, got a boolean.", name)
    if not isinstance(value, tuple(accepted)):
        raise ConfigError(
            f"{name}: expected {'/'.join(t.__name__ for t in accepted)}, got {type(value).__name__} {value!r}.", name
        )


class Controller:
    """Configures, starts, pauses, resumes and stops the phases of one run folder, one child process at a time."""

    def __init__(self, run_dir: str | Path, *, preset: str = "tiny", config_dir: str | Path | None = None,
                 configs: dict[int, str | Path] | None = None, pipeline: str | Path | None = None,
                 python: str = sys.executable) -> None:  # fmt: skip
        self.run_dir = Path(run_dir).resolve()
        self.control_dir = self.run_dir / CONTROL_DIRNAME
        self.config_dir = Path(config_dir) if config_dir else REPO_ROOT / "recipes" / "configs"
        self.preset = preset
        self.configs = {int(k): Path(v).resolve() for k, v in (configs or {}).items()}
        # With a pipeline YAML the child is the pipeline runner (recipes/pipeline.py) limited to the phase asked for;
        # without one, the phase's own recipe.
        self.pipeline = Path(pipeline).resolve() if pipeline else None
        self._last_live: int | None = None
        self.python = python
        self.overrides: dict[int, dict] = {}
        self.outcomes: dict[int, dict] = {}  # this session's finished/paused/failed/stopped children
        self.process: subprocess.Popen | None = None
        self.process_phase: int | None = None
        self._stop_requested = False
        self._lock = threading.RLock()
        self._log_handle = None

    # ---- configuration
    def _pipeline_entries(self) -> dict[int, dict]:
        data = yaml.safe_load(self.pipeline.read_text()) or {}
        return {int(k): dict(v or {}) for k, v in (data.get("phases") or {}).items()}

    def config_path(self, number: int) -> Path:
        """The phase's YAML: given with `configs`, else named by the pipeline YAML, else the preset's."""
        get_phase(number)
        if number in self.configs:
            return self.configs[number]
        if self.pipeline is not None and self._pipeline_entries().get(number, {}).get("config"):
            path = Path(self._pipeline_entries()[number]["config"])
            return path.resolve() if path.is_absolute() or path.exists() else REPO_ROOT / path
        return self.config_dir / f"phase{number}_{self.preset}.yaml"

    def base_config(self, number: int) -> dict:
        """The phase's YAML (plus the pipeline YAML's overrides for it)."""
        path = self.config_path(number)
        if not path.exists():
            raise ConfigError(
                f"No config for phase {number}: {path} does not exist. Fix: pass --config {number}=FILE."
            )
        config = yaml.safe_load(path.read_text()) or {}
        if self.pipeline is not None:
            config.update(self._pipeline_entries().get(number, {}).get("overrides") or {})
        return config

    def added_fields(self, number: int) -> dict:
        """What the service adds to a phase's config: the configured fields, then trackio tracking."""
        return {**self.overrides.get(number, {}), **(TRACKING if get_phase(number).tracking else {})}

    def effective_config(self, number: int, *, resume: bool = False) -> dict:
        """Preset, then configured fields, then the run folder's paths and tracking (and resume fields)."""
        spec = get_phase(number)
        config = {**self.base_config(number), **self.added_fields(number)}
        config.update(spec.paths(self.run_dir))
        if resume and spec.resume is not None:
            config.update(spec.resume(self.run_dir))
        return config

    def validate(self, number: int, config: dict, submitted: tuple[str, ...] = ()) -> None:
        """Build the phase's config class from `config`; a refusal becomes a `ConfigError` naming the field (the
        one the message names as `Class.field`, else a `submitted` one it mentions, else any it mentions)."""
        cls = get_phase(number).load_config_class()
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        # The class annotations, not `Field.type`: transformers' argument parser rewrites `Field.type` in place.
        hints = typing.get_type_hints(cls)
        for name, value in config.items():
            if name not in fields:
                raise ConfigError(f"{name}: {cls.__name__} has no field {name!r}.", name)
            _check_type(name, hints.get(name, fields[name].type), value)
        try:
            cls(**config)
        except (ValueError, TypeError) as error:
            message = str(error)
            qualified = re.findall(rf"\b{cls.__name__}\.(\w+)", message)
            mentioned = [n for n in (*submitted, *config) if re.search(rf"\b{re.escape(n)}\b", message)]
            field = next((n for n in qualified if n in fields), mentioned[0] if mentioned else None)
            prefix = "" if cls.__name__ in message else f"{cls.__name__}: "
            raise ConfigError(prefix + message, field) from None

    def configure(self, number: int, fields: dict) -> dict:
        """Validate `fields` on top of the current config and keep them for the next start; returns them all."""
        if not isinstance(fields, dict) or not fields:
            raise ConfigError('Send a JSON object of config fields, e.g. {"max_steps": 20}.')
        with self._lock:
            if self.live_phase() == number:
                raise Conflict(f"Phase {number} is running. Fix: stop or pause it before configuring.")
            self.validate(number, {**self.effective_config(number), **fields}, tuple(fields))
            self.overrides[number] = {**self.overrides.get(number, {}), **fields}
            return dict(self.overrides[number])

    # ---- the child process
    def live_phase(self) -> int | None:
        """The phase the child is running now (for a whole-pipeline run: the runner's current phase)."""
        with self._lock:
            self.poll()
            if self.process is None:
                return None
            live = self.process_phase
            if live is None:  # the whole pipeline: it says which phase it is in
                state = read_report(self.run_dir / PIPELINE_STATE_FILE)
                live = state.get("current_phase") if isinstance(state, dict) else None
            self._last_live = live if live is not None else self._last_live
            return live

    def _pipeline_yaml(self, number: int | None) -> Path:
        """The pipeline YAML of this run: the given one, with the run folder, absolute phase YAMLs, and each phase's
        added fields as `overrides`; `number` limits it to one phase (without the shared evaluation)."""
        data = yaml.safe_load(self.pipeline.read_text()) or {}
        data["output_dir"] = str(self.run_dir)
        entries = self._pipeline_entries()
        for n in entries:
            entries[n]["config"] = str(self.config_path(n))
            entries[n]["overrides"] = {**(entries[n].get("overrides") or {}), **self.added_fields(n)}
        data["phases"] = entries
        if number is not None:
            data.update(from_phase=number, to_phase=number, evaluate=False)
        path = self.control_dir / ("pipeline.yaml" if number is None else f"pipeline-phase{number}.yaml")
        _write_atomic(path, yaml.safe_dump(data, sort_keys=False))
        return path

    def start(self, number: int | None, *, resume: bool = False) -> dict:
        """Run phase `number` (resume=True: continue its paused run) in a child process; `number=None` runs the
        whole pipeline (every unfinished phase, then the shared evaluation and report; needs a pipeline YAML)."""
        with self._lock:
            live = self.live_phase()
            if self.process is not None:
                raise Conflict(f"Phase {live} is running. Fix: wait for it, or pause/stop it first.")
            if number is None and self.pipeline is None:
                raise Conflict("No pipeline YAML. Fix: start the dashboard with --pipeline FILE, or start a phase.")
            if number is not None:
                spec = get_phase(number)
                if not resume and (self.run_dir / spec.finished_marker).exists():
                    raise Conflict(f"Phase {number} already finished in {self.run_dir}. Fix: use another run folder.")
                self.validate(number, self.effective_config(number, resume=resume))
            if self.pipeline is not None:
                config_path = self._pipeline_yaml(number)
                command = [self.python, "-m", "recipes.pipeline", "--config", str(config_path)]
                if number is not None:  # the command line wins over the file
                    command += ["--from_phase", str(number), "--to_phase", str(number), "--evaluate", "false"]
            else:
                config_path = self.control_dir / f"phase{number}.yaml"
                config = self.effective_config(number, resume=resume)
                _write_atomic(config_path, yaml.safe_dump(config, sort_keys=False))
                command = [self.python, "-m", f"recipes.phase{number}", "--config", str(config_path)]
            (self.control_dir / CONTROL_FILE).unlink(missing_ok=True)
            (self.control_dir / PROGRESS_FILE).unlink(missing_ok=True)
            env = {**os.environ, "FORGE_CONTROL_DIR": str(self.control_dir),
                   "TRACKIO_DIR": str(self.run_dir / "trackio")}  # fmt: skip
            name = "pipeline" if number is None else f"phase{number}"
            self._log_handle = open(self.control_dir / f"{name}.log", "a")  # noqa: SIM115 - closed when reaped
            self._log_handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}: "
                                   f"{' '.join(command)}\n")  # fmt: skip
            self._log_handle.flush()
            self.process = subprocess.Popen(command, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
            self.process_phase = number
            self._last_live = number
            self._stop_requested = False
            if number is None:
                self.outcomes.clear()
            else:
                self.outcomes.pop(number, None)
            self._started = time.time()
            return {"phase": number, "pid": self.process.pid, "resume": resume, "config": str(config_path)}

    def pause(self, number: int) -> dict:
        """Ask the running phase to checkpoint at its next step and exit."""
        spec = get_phase(number)
        with self._lock:
            if self.live_phase() != number:
                raise Conflict(f"Phase {number} is not running.")
            if spec.resume is None:
                raise Conflict(f"Phase {number} ({spec.name}) has no resume yet. Fix: stop it, or let it finish.")
            _write_atomic(self.control_dir / CONTROL_FILE, json.dumps({"action": "pause", "time": time.time()}))
            return {"phase": number, "requested": "pause"}

    def resume(self, number: int) -> dict:
        """Continue a paused (or stopped) phase from its last checkpoint through the recipe's own resume."""
        spec = get_phase(number)
        with self._lock:
            status = self.phase_status(number)["status"]
            if status not in ("paused", "stopped", "failed", "interrupted"):
                raise Conflict(f"Phase {number} is {status}; a paused, stopped, failed or interrupted phase resumes.")
            if spec.resume is None:
                raise Conflict(f"Phase {number} ({spec.name}) has no resume yet. Fix: start it again.")
            return self.start(number, resume=True)

    def stop(self, number: int) -> dict:
        """Terminate the running phase (SIGTERM to its process group); it keeps its last checkpoint, if any."""
        with self._lock:
            if self.live_phase() != number:
                raise Conflict(f"Phase {number} is not running.")
            self._stop_requested = True
            os.killpg(self.process.pid, signal.SIGTERM)
            return {"phase": number, "requested": "stop"}

    def poll(self) -> None:
        """Record the outcome of a child that has exited."""
        with self._lock:
            if self.process is None or self.process.poll() is None:
                return
            code, number = self.process.returncode, self.process_phase or self._last_live
            if code == 0:
                status = "finished"
            elif code == PAUSED_EXIT_CODE:
                status = "paused"
            elif self._stop_requested:
                status = "stopped"
            else:
                status = "failed"
            error = None if status in ("finished", "paused", "stopped") else self._log_tail(self.process_phase)
            if number is not None and not (self.process_phase is None and status == "finished"):
                # (a whole-pipeline run that finished leaves the statuses to pipeline_state.json)
                self.outcomes[number] = {"status": status, "returncode": code, "error": error,
                                         "started": self._started, "ended": time.time()}  # fmt: skip
            self._log_handle.close()
            self.process = self.process_phase = self._log_handle = None
            (self.control_dir / CONTROL_FILE).unlink(missing_ok=True)

    def _log_tail(self, number: int | None) -> str:
        path = self.control_dir / ("pipeline.log" if number is None else f"phase{number}.log")
        return path.read_text()[-LOG_TAIL_CHARS:] if path.exists() else ""

    def shutdown(self) -> None:
        """Stop a running child (the service is going away)."""
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                self._stop_requested = True
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            self.poll()

    # ---- status
    def progress(self) -> dict | None:
        return read_report(self.control_dir / PROGRESS_FILE)

    def pipeline_state(self) -> dict:
        """Per-phase entries of `<run>/pipeline_state.json` (written by the pipeline runner), keyed by number."""
        state = read_report(self.run_dir / PIPELINE_STATE_FILE)
        if not isinstance(state, dict):
            return {}
        phases = state.get("phases", state)
        if isinstance(phases, list):
            return {int(p["phase"]): p for p in phases if isinstance(p, dict) and "phase" in p}
        return {int(k): v for k, v in phases.items() if str(k).isdigit() and isinstance(v, dict)}

    def phase_status(self, number: int) -> dict:
        """Status (pending, running, pausing, paused, stopped, failed, finished), progress and outcome."""
        spec = get_phase(number)
        with self._lock:
            live = self.live_phase() == number
            outcome = self.outcomes.get(number)
            pipeline = self.pipeline_state().get(number)
            if live:
                pausing = (self.control_dir / CONTROL_FILE).exists()
                status = "pausing" if pausing else "running"
            elif outcome is not None:
                status = outcome["status"]
            elif (self.run_dir / spec.finished_marker).exists():
                status = "finished"
            else:
                status = _pipeline_status(pipeline) or "pending"
            return {
                "phase": number,
                "name": spec.name,
                "status": status,
                "resumable": spec.resume is not None,
                "progress": self.progress() if (live or status == "paused") else None,
                "outcome": outcome,
                "pipeline": pipeline,
                "overrides": dict(self.overrides.get(number, {})),
            }

    def pipeline_status(self) -> dict:
        """Every phase's status, the pipeline runner's own state (when it has run here) and its report."""
        state = read_report(self.run_dir / PIPELINE_STATE_FILE)
        keys = ("status", "current_phase", "evaluation", "updated")
        runner = {k: state.get(k) for k in keys} if isinstance(state, dict) else None
        report = self.run_dir / "pipeline_report.md"
        return {"run_dir": str(self.run_dir), "phases": [self.phase_status(n) for n in sorted(PHASES)],
                "runner": runner, "report": "pipeline_report.md" if report.exists() else None}  # fmt: skip


def _pipeline_status(entry: dict | None) -> str | None:
    """A phase's status from pipeline_state.json when no child of this service runs it: a phase the runner was in
    when it went away is `interrupted` (resumable); a pause it recorded as an error is `paused`."""
    if not entry:
        return None
    status = entry.get("status")
    if status == "running":
        return "interrupted"
    if status == "failed":
        return "paused" if str(entry.get("error") or "").startswith("PauseRequested") else "failed"
    return status if status == "finished" else None  # pending/skipped: the folder on disk decides


class EventHub:
    """Polls the controller, the progress file and trackio; appends `status`, `progress`, `metric`, `alert` and
    `complete` events (ids increase by one) for the stream. Changes found in one poll are ordered: phases starting,
    then progress, metrics, alerts, then phases ending (so a phase's last metrics come before its `complete`)."""

    def __init__(self, controller: Controller, interval_s: float = 0.5) -> None:
        self.controller = controller
        self.reader = TrackioReader(controller.run_dir)
        self.interval_s = interval_s
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._statuses = {n: controller.phase_status(n)["status"] for n in PHASES}
        self._metric_ids = self._last_ids(self.reader.metrics())
        self._alert_ids = self._last_ids(self.reader.alerts())
        self._progress_key = None

    @staticmethod
    def _last_ids(rows: list[dict]) -> dict[str, int]:
        last: dict[str, int] = {}
        for row in rows:
            last[row["project"]] = max(last.get(row["project"], 0), row["id"])
        return last

    def emit(self, kind: str, phase: int | None, data: dict) -> None:
        with self._lock:
            event = {"id": len(self.events) + 1, "type": kind, "time": time.time(), "phase": phase, "data": data}
            self.events.append(event)

    def since(self, event_id: int) -> list[dict]:
        with self._lock:
            return self.events[max(event_id, 0) :]

    @property
    def last_id(self) -> int:
        with self._lock:
            return len(self.events)

    def poll_once(self) -> None:
        """One poll: compare with the last one and append the events in the documented order. Serialised: the
        background thread and the control endpoints both poll."""
        with self._poll_lock:
            self._poll_once()

    def _poll_once(self) -> None:
        statuses = {n: self.controller.phase_status(n)["status"] for n in PHASES}
        changed = {n: s for n, s in statuses.items() if s != self._statuses.get(n)}
        active = ("running", "pausing")
        for number, status in changed.items():
            if status in active:
                self.emit("status", number, {"status": status, "previous": self._statuses.get(number)})
        progress = self.controller.progress()
        live = self.controller.live_phase()
        if progress and live is not None:
            key = (progress.get("run_name"), progress.get("step"))
            if key != self._progress_key:
                self._progress_key = key
                self.emit("progress", live, progress)
        metrics = self.reader.metrics(self._metric_ids)
        for row in metrics:
            self.emit("metric", row["phase"] or live, {k: row[k] for k in ("run", "step", "metrics")})
        self._metric_ids.update(self._last_ids(metrics))
        alerts = self.reader.alerts(self._alert_ids)
        for row in alerts:
            self.emit("alert", row["phase"] or live, {k: row[k] for k in ("run", "title", "text", "level")})
        self._alert_ids.update(self._last_ids(alerts))
        for number, status in changed.items():
            if status in active:
                continue
            outcome = self.controller.outcomes.get(number) or {}
            if status == "failed":
                self.emit("alert", number, {"run": f"phase{number}", "title": "phase_failed", "level": "error",
                                            "text": (outcome.get("error") or "")[-800:]})  # fmt: skip
            self.emit("complete" if status == "finished" else "status", number,
                      {"status": status, "previous": self._statuses.get(number)})  # fmt: skip
        self._statuses = statuses

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as error:  # a poll must never kill the stream; say so and try again
                self.emit("alert", None, {"run": "dashboard", "title": "poll_error", "level": "error",
                                          "text": repr(error)})  # fmt: skip
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="forge-dashboard-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


__all__ = ["ConfigError", "Conflict", "Controller", "EventHub"]
