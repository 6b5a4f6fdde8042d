"""lm-evaluation-harness as a second backend: our tasks exported as local lm-eval task YAMLs, run on a Forge folder.

    from evaluation.lm_eval_adapter import run_lm_eval

    results = run_lm_eval("outputs/demo", ["arc-easy"], data_files={"arc-easy": "arc_easy_test.jsonl"}, limit=100)

lm-eval's built-in tasks download their data from the Hub, so instead each task's documents (loaded by
`evaluation.benchmarks`, from the Hub or local files) are written to a JSONL file with a YAML beside it
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`); lm-eval reads those offline and evaluates the folder
with `--model hf` and `trust_remote_code=True`. Multiple-choice tasks use lm-eval's own `multiple_choice` scoring
(acc, acc_norm); exact-match tasks use `generate_until` with our answer extraction (a `process_results` hook);
pass@k tasks are refused, because lm-eval runs model-written code on the host (ours go through the sandbox).

lm-eval is the optional extra `eval` (`pip install -e ".[eval]"`); nothing here imports it until it is used.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers.utils import logging

from evaluation.benchmarks import EVAL_TASKS, DataFiles, EvalTask, get_eval_task

logger = logging.get_logger(__name__)

LM_EVAL_PREFIX = "forge_"
UTILS_MODULE = "forge_lm_eval_utils"
_UTILS_SOURCE = '''"""Written by evaluation.lm_eval_adapter: scores generations with our answer extraction."""

from evaluation.lm_eval_adapter import process_generation


def process_results(doc, results):
    return process_generation(doc, results)
'''


def lm_eval_task_name(task: EvalTask) -> str:
    """The lm-eval name of an exported task (`forge_` + the task name with non-word characters as `_`)."""
    return LM_EVAL_PREFIX + re.sub(r"\W", "_", task.name)


def process_generation(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval `process_results` for exported exact-match tasks: our extraction, then string equality."""
    task = get_eval_task(doc["task"])
    predicted = task.extract_answer(results[0])
    return {"exact_match": float(predicted is not None and predicted == doc["answer"])}


def _task_config(task: EvalTask, name: str, data_file: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "doc_to_text": "prompt",
        "target_delimiter": task.target_delimiter,
        "metadata": {"version": 1.0, "agent_forge_task": task.name},
    }
    if task.mode == "multiple_choice":
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
        }
    else:
        config |= {
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": {
                "until": list(task.stop_sequences),
                "max_gen_toks": task.max_new_tokens,
                "do_sample": False,
            },
            "process_results": f"!function {UTILS_MODULE}.process_results",
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    return config


def export_lm_eval_tasks(
    tasks: Sequence[str | EvalTask],
    directory: str | Path,
    *,
    limit: int | None = None,
    data_files: Mapping[str, DataFiles] | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Write each task's documents (JSONL) and lm-eval YAML into `directory`; returns {our name: lm-eval name}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data_files = dict(data_files or {})
    names: dict[str, str] = {}
    for item in tasks:
        task = get_eval_task(item)
        if task.mode == "pass_at_k":
            raise ValueError(
                f"Task {task.name!r} is scored by running model-written code; lm-eval would run it on the host. "
                "Evaluate it with the agent-forge backend, which runs code in evaluation.sandbox."
            )
        registered = EVAL_TASKS.get(task.name)
        if task.mode == "exact_match" and (registered is None or registered.extract_answer is not task.extract_answer):
            raise ValueError(
                f"Exact-match task {task.name!r} must be registered (register_eval_task) so that lm-eval's "
                "process_results hook finds its answer extraction by name."
            )
        name = lm_eval_task_name(task)
        docs = task.docs(limit=limit, data_files=data_files.get(task.name), seed=seed)
        data_file = directory / f"{name}.jsonl"
        with open(data_file, "w", encoding="utf-8") as handle:
            for doc in docs:
                handle.write(json.dumps({**doc.to_json(), "task": task.name}) + "\n")
        text = yaml.safe_dump(_task_config(task, name, data_file.resolve()), sort_keys=False, allow_unicode=True)
        # The `!function` tag must stay a YAML tag, not a quoted string.
        text = re.sub(r"'(!function [\w.]+)'", r"\1", text)
        (directory / f"{name}.yaml").write_text(text, encoding="utf-8")
        names[task.name] = name
    (directory / f"{UTILS_MODULE}.py").write_text(_UTILS_SOURCE, encoding="utf-8")
    return names


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str | EvalTask],
    *,
    limit: int | None = None,
    data_files: Mapping[str, DataFiles] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    work_dir: str | Path | None = None,
    log_samples: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate the checkpoint folder `model_dir` with lm-eval on our tasks; results in `evaluate_model`'s format."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            "The lm-eval backend needs lm-evaluation-harness: pip install -e '.[eval]' (or `pip install lm-eval`)."
        ) from err
    resolved = [get_eval_task(task) for task in tasks]
    with tempfile.TemporaryDirectory(prefix="forge-lm-eval-") as scratch:
        directory = Path(work_dir) if work_dir is not None else Path(scratch)
        names = export_lm_eval_tasks(resolved, directory, limit=limit, data_files=data_files, seed=seed)
        started = time.perf_counter()
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "trust_remote_code": True},
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=str(directory), include_defaults=False),
            batch_size=batch_size,
            device=device,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=0,
        )
        seconds = round(time.perf_counter() - started, 3)
    if output is None:
        raise RuntimeError("lm-eval returned no results (not the main process?).")
    results: dict[str, dict[str, Any]] = {}
    for task in resolved:
        name = names[task.name]
        raw = output["results"][name]
        metrics = {
            key.split(",")[0]: float(value)
            for key, value in raw.items()
            if "," in key and not key.split(",")[0].endswith("_stderr")
        }
        result = {
            "task": task.name,
            "mode": task.mode,
            "dataset": task.dataset,
            "split": task.split,
            "source": "local:" + str(data_files[task.name]) if data_files and task.name in data_files else "hub",
            "backend": f"lm-eval {lm_eval.__version__}",
            "n": int(output["n-samples"][name]["effective"]),
            "num_samples": 1,
            "metrics": metrics,
            "primary_metric": task.primary_metric,
            "score": metrics[task.primary_metric],
            "seconds": seconds,
        }
        if task.dataset.startswith("agent-forge/"):
            result["source"] = "built-in"
        if log_samples:
            result["samples"] = output["samples"][name]
        results[task.name] = result
    return results


__all__ = ["export_lm_eval_tasks", "lm_eval_task_name", "process_generation", "run_lm_eval"]
