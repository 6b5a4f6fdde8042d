"""The pipeline runner: Phases 1 -> 6 folder to folder, finished phases skipped, a cut phase resumed, one run report.

    python recipes/pipeline.py --config recipes/configs/pipeline_tiny.yaml
    python recipes/pipeline.py --config recipes/configs/pipeline_tiny.yaml --from_phase 3 --to_phase 4

    from trainers.pipeline import PipelineConfig, run_pipeline
    summary = run_pipeline(PipelineConfig(config_file="recipes/configs/pipeline_tiny.yaml"))

Each phase is its trainer's own `run_phaseN(config)`, with the config parsed from that phase's YAML (`phases.N.config`)
plus `phases.N.overrides`, and with its input and output set to the run folder's layout, so phase N reads phase N-1's
folder:

| phase | reads | writes (a finished phase = this folder exists) |
|---|---|---|
| 1 cognate | - | `<run>/phase1/{init,reasoning,memory,speed}` |
| 2 evomerge | `<run>/phase1` | `<run>/phase2/champion` |
| 3 quietstar | `<run>/phase2/champion` | `<run>/phase3` |
| 4 bitnet | `<run>/phase3` | `<run>/phase4` |
| 5 curriculum | `<run>/phase4` | `<run>/phase5` |
| 6 persona | `<run>/phase5` | `<run>/phase6` |

Phases write atomically, so a folder that exists is finished and is skipped; a phase cut short is run again with its
own `resume` switch (Phases 1, 2, 4, 5 and 6 continue from their last checkpoint, generation, level or cycle; Phase 3
starts over, being short and seeded). After the phases, every finished phase's model is evaluated on the **same** tasks
(`evaluation`: test split of the built-in families, fixed seed and limit; phases select on train/validation items
only) and `<run>/pipeline_report.md` (+ `<run>/plots/pipeline_*.png`) puts them side by side with each phase's change.

**Live state** (`<run>/pipeline_state.json`, replaced atomically after every change, for the dashboard and for
humans)::

    {"version": 1, "status": "running" | "finished" | "failed", "pid": 1234, "run_dir": "outputs/tiny",
     "config_file": "recipes/configs/pipeline_tiny.yaml", "from_phase": 1, "to_phase": 6,
     "started": "2026-12-05T10:00:00+00:00", "updated": "...", "ended": null | "...", "current_phase": 3 | null,
     "phases": {"1": {"number": 1, "name": "cognate", "status": "pending" | "running" | "finished" | "failed" |
                      "skipped", "output": "outputs/tiny/phase1", "started": null | iso, "ended": null | iso,
                      "seconds": null | float, "error": null | "Type: message", "note": null | str}, ...},
     "evaluation": {"status": "pending" | "running" | "finished" | "failed" | "skipped", "error": null | str},
     "report": null | "outputs/tiny/pipeline_report.md"}

`skipped` means the phase's folder was already finished (note: "already finished") or the phase lies outside
`from_phase..to_phase` (note: "outside the requested range"); `finished` means it ran to completion in this
invocation. Times are UTC ISO 8601.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.utils import logging

from .config_fields import json_field

logger = logging.get_logger(__name__)

STATE_FILE = "pipeline_state.json"
EVAL_FILE = "pipeline_eval.json"
REPORT_FILE = "pipeline_report.md"
PHASE1_MODELS = ("reasoning", "memory", "speed")
STATUSES = ("pending", "running", "finished", "failed", "skipped")
DEFAULT_EVALUATION = {
    "tasks": {"arithmetic": {"difficulty": 1}, "kv_recall": {"difficulty": 1}, "code": {"difficulty": 1}},
    "limit": 32,
    "batch_size": 16,
    "seed": 0,
    "max_new_tokens": None,
}


# ----------------------------------------------------------------------------------------------------------------
# The phase table


@dataclass(frozen=True)
class PhaseSpec:
    """How the runner drives one phase: where its config and run function live and how it chains to the run folder."""

    number: int
    name: str
    config: str  # "module:Class"
    run: str  # "module:function"
    chain: Callable[[Path, Path], dict[str, Any]]  # (run folder, input model folder) -> config fields
    output: Callable[[Path], Path]  # run folder -> the folder whose existence means "finished"
    models: Callable[[Path], dict[str, Path]]  # run folder -> the models this phase hands over (label -> folder)
    resume: Callable[[Path], dict[str, Any]] = lambda run: {}  # run folder -> fields that resume a cut run
    handover: Callable[[Path], Path] | None = None  # run folder -> the model the next phase reads (default: output)

    def next_input(self, run: Path) -> Path:
        """The folder the next phase reads."""
        return self.handover(run) if self.handover else self.output(run)

    def load(self, attribute: str):
        """Import `config` or `run` lazily (Phase 5 may not be installed; peft and trl import slowly)."""
        module, name = getattr(self, attribute).split(":")
        return getattr(importlib.import_module(module), name)


def _phase1_finished(run: Path) -> Path:
    return run / "phase1" / PHASE1_MODELS[-1]


def _resume(run: Path) -> dict[str, Any]:
    """Every phase's own `resume` switch: a finished output is kept, a cut run continues where it can."""
    return {"resume": True}


PHASES: dict[int, PhaseSpec] = {
    spec.number: spec
    for spec in (
        PhaseSpec(1, "cognate", "trainers.cognate_config:CognateConfig", "trainers.cognate_trainer:run_phase1",
                  chain=lambda run, source: {"output_dir": str(run)}, output=_phase1_finished,
                  models=lambda run: {f"1 cognate ({n})": run / "phase1" / n for n in PHASE1_MODELS},
                  resume=_resume, handover=lambda run: run / "phase1" / PHASE1_MODELS[0]),
        PhaseSpec(2, "evomerge", "trainers.evomerge_config:EvoMergeConfig", "trainers.evomerge:run_phase2",
                  chain=lambda run, source: {"output_dir": str(run), "phase1_dir": str(run / "phase1")},
                  output=lambda run: run / "phase2" / "champion",
                  models=lambda run: {"2 evomerge (champion)": run / "phase2" / "champion"},
                  resume=_resume),
        PhaseSpec(3, "quietstar", "trainers.quietstar_config:QuietStarConfig", "trainers.quietstar_trainer:run_phase3",
                  chain=lambda run, source: {"output_dir": str(run), "model_name_or_path": str(source)},
                  output=lambda run: run / "phase3", models=lambda run: {"3 quietstar": run / "phase3"},
                  resume=_resume),
        PhaseSpec(4, "bitnet", "trainers.bitnet_config:BitNetConfig", "trainers.bitnet_trainer:run_phase4",
                  chain=lambda run, source: {"output_dir": str(run / "phase4"), "model_name_or_path": str(source)},
                  output=lambda run: run / "phase4", models=lambda run: {"4 bitnet": run / "phase4"},
                  resume=_resume),
        PhaseSpec(5, "curriculum", "trainers.curriculum_config:CurriculumConfig",
                  "trainers.curriculum_trainer:run_phase5",
                  chain=lambda run, source: {"output_dir": str(run / "phase5"), "model_name_or_path": str(source)},
                  output=lambda run: run / "phase5", models=lambda run: {"5 curriculum": run / "phase5"},
                  resume=_resume),
        PhaseSpec(6, "persona", "trainers.persona_config:PersonaConfig", "trainers.persona_trainer:run_phase6",
                  chain=lambda run, source: {"output_dir": str(run / "phase6"), "model_name_or_path": str(source)},
                  output=lambda run: run / "phase6", models=lambda run: {"6 persona": run / "phase6"},
                  resume=_resume),
    )
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class PipelineConfig:
    """The whole run: the run folder, each phase's YAML (+ overrides), the phase range and the shared evaluation."""

    config_file: str | None = field(
        default=None, metadata={"help": "The pipeline YAML (recipes/configs/pipeline_*.yaml); fields below override."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "The run folder; every phase writes under it."})
    phases: dict | str | None = field(
        default=None,
        metadata={"help": "Phase number -> {config: phase YAML, overrides: {field: value}} (YAML mapping)."},
    )
    from_phase: int = field(default=1, metadata={"help": "First phase to run (earlier ones must be finished)."})
    to_phase: int = field(default=6, metadata={"help": "Last phase to run."})
    skip_phases: list | str | None = field(
        default=None,
        metadata={"help": "Phases (2-5) left out of the chain: the next phase reads the one before (e.g. [5])."},
    )
    evaluation: dict | str | None = field(
        default=None,
        metadata={"help": f"The shared evaluation of every phase's model; default {DEFAULT_EVALUATION}."},
    )
    evaluate: bool = field(default=True, metadata={"help": "Evaluate every finished phase and write the report."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload each finished phase folder and the report."})
    hub_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub repo prefix for --push_to_hub: <id>-phaseN (Phase 1: <id>-phase1-<name>)."},
    )

    def __post_init__(self) -> None:
        if self.config_file:
            values = yaml.safe_load(Path(self.config_file).read_text()) or {}
            known = {f.name for f in dataclasses.fields(self)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{self.config_file}: unknown pipeline fields {unknown}. Fix: use {sorted(known)}.")
            for name, value in values.items():
                default = next(f for f in dataclasses.fields(self) if f.name == name)
                current = getattr(self, name)
                is_default = current == (default.default if default.default is not dataclasses.MISSING else None)
                if is_default:  # the command line (a non-default value) wins over the file
                    setattr(self, name, value)
        self.phases = json_field(self.phases, "PipelineConfig", "phases") or {}
        self.phases = {int(k): dict(v or {}) for k, v in self.phases.items()}
        skip = json_field(self.skip_phases, "PipelineConfig", "skip_phases") or []
        self.skip_phases = sorted(int(n) for n in ([skip] if isinstance(skip, int) else skip))
        if not set(self.skip_phases) <= {2, 3, 4, 5}:
            raise ValueError(f"PipelineConfig.skip_phases is {self.skip_phases}. Fix: only phases 2-5 can be left out "
                             "(Phase 1 starts the chain, Phase 6 ends it).")  # fmt: skip
        self.evaluation = {**DEFAULT_EVALUATION, **(json_field(self.evaluation, "PipelineConfig", "evaluation") or {})}
        if not self.output_dir:
            raise ValueError("PipelineConfig.output_dir is not set. Fix: set output_dir (the run folder) in the YAML.")
        unknown = sorted(set(self.phases) - set(PHASES))
        if unknown:
            raise ValueError(f"PipelineConfig.phases names unknown phases {unknown}. Fix: use numbers 1-6.")
        if not 1 <= self.from_phase <= self.to_phase <= 6:
            raise ValueError(
                f"PipelineConfig.from_phase/to_phase must satisfy 1 <= from <= to <= 6, got {self.from_phase}.."
                f"{self.to_phase}. Fix: e.g. --from_phase 3 --to_phase 4."
            )
        for number in range(self.from_phase, self.to_phase + 1):
            if number in self.skip_phases:
                continue
            entry = self.phases.get(number)
            if not entry or not entry.get("config"):
                raise ValueError(f"PipelineConfig.phases[{number}] has no `config`. Fix: name its YAML, e.g. "
                                 f"recipes/configs/phase{number}_tiny.yaml.")  # fmt: skip
            extra = sorted(set(entry) - {"config", "overrides"})
            if extra:
                raise ValueError(
                    f"PipelineConfig.phases[{number}] has unknown keys {extra}. Fix: use config, overrides."
                )
        if not isinstance(self.evaluation.get("tasks"), dict) or not self.evaluation["tasks"]:
            raise ValueError("PipelineConfig.evaluation.tasks must map task names to options. Fix: e.g. "
                             "{arithmetic: {difficulty: 1}}.")  # fmt: skip
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("PipelineConfig.push_to_hub needs hub_model_id. Fix: pass --hub_model_id user/forge.")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def previous(self, number: int) -> int | None:
        """The phase whose model phase `number` reads: the closest earlier phase not in `skip_phases`."""
        earlier = [n for n in range(1, number) if n not in self.skip_phases]
        return earlier[-1] if earlier else None

    def input_of(self, number: int) -> Path | None:
        """The folder phase `number` reads (None for Phase 1)."""
        previous = self.previous(number)
        return PHASES[previous].next_input(self.run_dir) if previous else None

    def phase_config(self, number: int, resume: bool = False):
        """Phase `number`'s config object: its YAML, then the pipeline's overrides, then the run folder's chaining."""
        spec = PHASES[number]
        entry = self.phases[number]
        values = yaml.safe_load(Path(entry["config"]).read_text()) or {}
        values.update(entry.get("overrides") or {})
        values.update(spec.chain(self.run_dir, self.input_of(number)))
        if resume:
            values.update(spec.resume(self.run_dir))
        config_class = spec.load("config")
        (config,) = HfArgumentParser(config_class).parse_dict(values, allow_extra_keys=False)
        return config


# ----------------------------------------------------------------------------------------------------------------
# Live state


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class PipelineState:
    """`pipeline_state.json`: what the runner is doing, rewritten atomically on every change (format: module doc)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.path = config.run_dir / STATE_FILE
        self.data: dict[str, Any] = {
            "version": 1, "status": "running", "pid": os.getpid(), "run_dir": str(config.run_dir),
            "config_file": config.config_file, "from_phase": config.from_phase, "to_phase": config.to_phase,
            "started": _now(), "updated": _now(), "ended": None, "current_phase": None,
            "phases": {str(n): {"number": n, "name": spec.name, "status": "pending", "output": str(spec.output(
                config.run_dir)), "started": None, "ended": None, "seconds": None, "cpu_seconds": None, "error": None,
                "note": None}
                for n, spec in PHASES.items()},
            "evaluation": {"status": "pending" if config.evaluate else "skipped", "error": None},
            "report": None,
        }  # fmt: skip
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json_atomic(self.path, self.data)

    def phase(self, number: int, **values: Any) -> None:
        if "status" in values and values["status"] not in STATUSES:
            raise ValueError(f"Unknown phase status {values['status']!r}; use one of {STATUSES}.")
        self.data["phases"][str(number)].update(values)
        self.save()

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.save()


# ----------------------------------------------------------------------------------------------------------------
# Running


def phase_finished(run_dir: Path, number: int) -> bool:
    """A phase is finished when its output folder exists (phases write atomically) and holds a model config."""
    output = PHASES[number].output(run_dir)
    return (output / "config.json").exists()


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (sandboxed code, workers): on a shared
    machine it estimates the phase's unshared wall time better than the wall clock does."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_pipeline(config: PipelineConfig, *, runners: dict[int, Callable] | None = None) -> dict[str, Any]:
    """Run phases `from_phase..to_phase` (skipping finished ones), evaluate, write the report; returns a summary.

    `runners` replaces a phase's run function (tests script phases with it); the default is the phase's trainer.
    """
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    state = PipelineState(config)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "phases": {}}
    try:
        for number, spec in PHASES.items():
            if number in config.skip_phases:
                state.phase(number, status="skipped", note="left out by skip_phases")
                continue
            if not config.from_phase <= number <= config.to_phase:
                note = "already finished" if phase_finished(run_dir, number) else "outside the requested range"
                state.phase(number, status="skipped", note=note)
                continue
            previous = config.previous(number)
            if previous is not None and not phase_finished(run_dir, previous):
                raise RuntimeError(f"Phase {number} ({spec.name}) needs the finished Phase {previous} at "
                                   f"{PHASES[previous].output(run_dir)}. Fix: run from phase {previous} "
                                   f"(--from_phase {previous}).")  # fmt: skip
            if phase_finished(run_dir, number):
                logger.info("Phase %d (%s) is finished at %s: skipped", number, spec.name, spec.output(run_dir))
                state.phase(number, status="skipped", note="already finished")
                summary["phases"][number] = "skipped"
                continue
            started, cpu_started = time.time(), _cpu_seconds()
            state.phase(number, status="running", started=_now())
            state.update(current_phase=number)
            try:
                phase_config = config.phase_config(number, resume=True)
                run = (runners or {}).get(number) or spec.load("run")
                logger.info("Phase %d (%s): running", number, spec.name)
                run(phase_config)
            except BaseException as error:
                state.phase(number, status="failed", ended=_now(), seconds=round(time.time() - started, 1),
                            cpu_seconds=round(_cpu_seconds() - cpu_started, 1),
                            error=f"{type(error).__name__}: {error}")  # fmt: skip
                raise
            if not phase_finished(run_dir, number):
                raise RuntimeError(f"Phase {number} ({spec.name}) returned without writing {spec.output(run_dir)}.")
            state.phase(
                number,
                status="finished",
                ended=_now(),
                seconds=round(time.time() - started, 1),
                cpu_seconds=round(_cpu_seconds() - cpu_started, 1),
            )
            summary["phases"][number] = "finished"
        state.update(current_phase=None)
        if config.evaluate:
            state.data["evaluation"]["status"] = "running"
            state.save()
            try:
                started, cpu_started = time.time(), _cpu_seconds()
                results = evaluate_phases(config)
                state.data["evaluation"].update(seconds=round(time.time() - started, 1),
                                                cpu_seconds=round(_cpu_seconds() - cpu_started, 1))  # fmt: skip
                report = write_report(config, results, state.data)
            except BaseException as error:
                state.data["evaluation"].update(status="failed", error=f"{type(error).__name__}: {error}")
                state.save()
                raise
            state.data["evaluation"]["status"] = "finished"
            state.update(report=str(report))
            summary.update(report=str(report), evaluation=results)
        if config.push_to_hub:
            summary["pushed"] = push_run(config)
    except BaseException:
        state.update(status="failed", ended=_now(), current_phase=None)
        logger.error("Pipeline failed:\n%s", traceback.format_exc())
        raise
    state.update(status="finished", ended=_now())
    summary["state"] = state.data
    return summary


def push_run(config: PipelineConfig) -> list[str]:
    """Upload every finished phase's model folder to `<hub_model_id>-phaseN` (Phase 1: `-phase1-<name>`) with
    `push_folder`, then the run report and its plot into the last phase's repo; returns the repo ids."""
    from huggingface_hub import HfApi

    from .phase_output import push_folder

    pushed = []
    for number, spec in PHASES.items():
        for label, folder in spec.models(config.run_dir).items():
            if not (folder / "config.json").exists():
                continue
            suffix = f"phase{number}" + (f"-{folder.name}" if number == 1 else "")
            pushed.append(
                push_folder(folder, f"{config.hub_model_id}-{suffix}", commit_message=f"Agent Forge {label}")
            )
    report = config.run_dir / REPORT_FILE
    if pushed and report.exists():
        api = HfApi()
        api.upload_file(path_or_fileobj=str(report), path_in_repo=REPORT_FILE, repo_id=pushed[-1])
        plot = config.run_dir / "plots" / "pipeline_scores.png"
        if plot.exists():
            api.upload_file(path_or_fileobj=str(plot), path_in_repo="plots/pipeline_scores.png", repo_id=pushed[-1])
    return pushed


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on the same tasks and the report


def _eval_key(folder: Path, evaluation: dict) -> str:
    from .phase_output import weights_sha256

    settings = json.dumps(evaluation, sort_keys=True, default=str)
    return hashlib.sha256(f"{weights_sha256(folder)}|{settings}".encode()).hexdigest()[:16]


def evaluate_phases(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Every finished phase model on the same tasks (test split); results cached in `<run>/pipeline_eval.json` by the
    weights' hash and the evaluation settings, so a re-run only evaluates what changed."""
    from evaluation.benchmarks import get_eval_task
    from evaluation.harness import evaluate_folder

    cache_path = config.run_dir / EVAL_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    evaluation = config.evaluation
    tasks = [get_eval_task(name, **(options or {})) for name, options in evaluation["tasks"].items()]
    results: dict[str, dict[str, Any]] = {}
    for number, spec in PHASES.items():
        for label, folder in spec.models(config.run_dir).items():
            if not (folder / "config.json").exists():
                continue
            key = _eval_key(folder, evaluation)
            if key not in cache:
                started = time.time()
                scored = evaluate_folder(
                    folder, tasks, limit=evaluation["limit"], batch_size=evaluation["batch_size"],
                    seed=evaluation["seed"], max_new_tokens=evaluation.get("max_new_tokens"),
                )  # fmt: skip
                cache[key] = {"folder": str(folder), "seconds": round(time.time() - started, 1),
                              "scores": {name: r["score"] for name, r in scored.items()},
                              "metric": {name: r["primary_metric"] for name, r in scored.items()},
                              "n": {name: r["n"] for name, r in scored.items()}}  # fmt: skip
                write_json_atomic(cache_path, cache)
            results[label] = {**cache[key], "phase": number}
    return results


def _phase_metrics(folder: Path) -> dict[str, float]:
    path = folder / "metrics.json"
    if not path.exists():
        return {}
    metrics = json.loads(path.read_text()).get("metrics", {})
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


HEADLINE_METRICS = (
    "eval/perplexity", "search/validation_fitness", "after_rl/accuracy_with_thoughts", "bitnet/compression_vs_fp32",
    "curriculum/start_level", "curriculum/level1_pass@1_before", "curriculum/level1_pass@1_after",
    "phase6/kept_bakes", "phase6/final_code_pass@1",
)  # fmt: skip


def write_report(config: PipelineConfig, results: dict[str, dict[str, Any]], state: dict[str, Any]) -> Path:
    """`<run>/pipeline_report.md` with the shared-evaluation table (and changes), phase times, headline metrics,
    Phase 6's A/B history, and `<run>/plots/pipeline_scores.png`."""
    run_dir = config.run_dir
    tasks = list(config.evaluation["tasks"])
    lines = [
        f"# Agent Forge run report: `{run_dir}`", "",
        f"Generated {_now()} by `trainers/pipeline.py` from `{config.config_file}`. Every model below was evaluated "
        f"on the same {config.evaluation['limit']} test-split items per task (seed {config.evaluation['seed']}, "
        "greedy decoding); no phase selects or trains on these items (phases use train and validation splits).", "",
        "## Shared evaluation", "",
        "| model | " + " | ".join(f"{t} ({next(iter(results.values()))['metric'][t] if results else ''})"
                                  for t in tasks) + " | change vs previous phase |",
        "|---|" + "---|" * len(tasks) + "---|",
    ]  # fmt: skip
    previous = None
    for label, result in results.items():
        scores = result["scores"]
        if previous is None or result["phase"] == 1:
            change = "-"
        else:
            change = ", ".join(f"{t} {100 * (scores[t] - previous[t]):+.1f} pts" for t in tasks)
        lines.append(f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks) + f" | {change} |")
        if result["phase"] == 1:  # the best Phase 1 model (mean score) is what Phase 2 is compared with
            best = previous if previous is not None and sum(previous.values()) >= sum(scores.values()) else scores
            previous = dict(best)
        else:
            previous = scores
    lines += [
        "",
        "Phase 1's change column is empty; Phase 2 is compared with the best Phase 1 model (mean score).",
        "",
    ]
    lines += ["## Phases", "", "| phase | status | seconds | CPU seconds | note | headline metrics |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for number, spec in PHASES.items():
        entry = state["phases"][str(number)]
        folder = next(iter(spec.models(run_dir).values()))
        metrics = _phase_metrics(folder)
        lineage = folder / "forge_lineage.json"
        wall = json.loads(lineage.read_text()).get("wall_time_s") if lineage.exists() else None
        seconds = entry["seconds"] if entry["seconds"] is not None else wall
        headline = ", ".join(f"`{k}` {v:.4g}" for k, v in metrics.items() if k in HEADLINE_METRICS)
        cpu = entry.get("cpu_seconds")
        lines.append(f"| {number} {spec.name} | {entry['status']} | {'' if seconds is None else f'{seconds:.0f}'} | "
                     f"{'' if cpu is None else f'{cpu:.0f}'} | {entry['note'] or ''} | {headline} |")  # fmt: skip
    evaluation = state.get("evaluation") or {}
    if evaluation.get("seconds") is not None:
        lines += ["", f"Shared evaluation (models not cached in `{EVAL_FILE}`): {evaluation['seconds']:.0f} s wall, "
                      f"{evaluation['cpu_seconds']:.0f} s CPU."]  # fmt: skip
    lines += [
        "",
        "Seconds: this invocation's wall time, or the phase's recorded wall time when it was skipped. CPU "
        "seconds: user + system time of the runner and its finished child processes during the phase (with "
        "OMP_NUM_THREADS=1 about the wall time the phase takes on an otherwise idle machine).",
        "",
    ]
    history_path = run_dir / "phase6" / "ab_history.json"
    if history_path.exists():
        history = json.loads(history_path.read_text())
        lines += ["## Phase 6 A/B history", "",
                  "| cycle | kind | winner | gain | 90% interval | kept |", "|---|---|---|---|---|---|"]  # fmt: skip
        for c in history["cycles"]:
            winner = c["winner"][:60].replace("|", "/").replace("\n", " ")
            lines.append(f"| {c['cycle']} | {c['kind']} | {winner} | {c['gain']:+.4f} | "
                         f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {'yes' if c['kept'] else 'no'} |")  # fmt: skip
        lines += ["", f"Stopped by {history['stopped']}.", ""]
    plot = _plot_scores(run_dir, results, tasks)
    if plot is not None:
        lines += ["## Plots", "", f"![shared evaluation]({plot.relative_to(run_dir)})", ""]
    path = run_dir / REPORT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _plot_scores(run_dir: Path, results: dict[str, dict[str, Any]], tasks: list[str]) -> Path | None:
    if not results:
        return None
    import numpy as np

    from hub_cards.plots import plt  # the headless Agg backend

    labels = list(results)
    width = 0.8 / len(tasks)
    figure, axis = plt.subplots(figsize=(max(6.4, 1.1 * len(labels)), 4.2), dpi=100)
    x = np.arange(len(labels))
    for i, task in enumerate(tasks):
        axis.bar(x + i * width, [results[label]["scores"][task] for label in labels], width, label=task)
    axis.set_xticks(x + width * (len(tasks) - 1) / 2, labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("score (test split)")
    axis.set_title("Every phase on the same evaluation tasks")
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    path = run_dir / "plots" / "pipeline_scores.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


__all__ = [
    "DEFAULT_EVALUATION",
    "PHASES",
    "REPORT_FILE",
    "STATE_FILE",
    "PhaseSpec",
    "PipelineConfig",
    "PipelineState",
    "evaluate_phases",
    "phase_finished",
    "push_run",
    "run_pipeline",
    "write_report",
]
