"""The evaluation harness: run a model on eval tasks and score it; what Phases 2, 3, 5 and 6 call.

    from evaluation.harness import composite_score, evaluate_model

    results = evaluate_model(model, tokenizer, ["arithmetic", "kv_recall", "humaneval"], limit=50, batch_size=16)
    results["arithmetic"]["score"], results["arithmetic"]["n"]       # primary metric, number of documents
    evaluate_model(model, tokenizer, ["arc-easy"], data_files={"arc-easy": "arc_easy_test.jsonl"})
    composite_score(results, {"arithmetic": 0.5, "humaneval": 0.5})  # Phase 6's weighted suite score

Per task (see `evaluation.benchmarks` for the registry):
- multiple choice: `loglikelihoods` of `delimiter + choice` after the prompt, tokenised and truncated exactly as
  lm-eval's `HFLM` does (so both backends give the same numbers); `acc` and the length-normalised `acc_norm`.
- exact match: `generate_completions` (transformers `generate`, batched with left padding, greedy or sampled, cut at
  the task's stop sequences), the task's `extract_answer`, then exact match; with n samples per document also pass@k.
- pass@k: n completions per problem run with the tests in `evaluation.sandbox`; the unbiased pass@k estimator.
Every metric goes through a local `evaluate` module (`evaluation.evaluate_metrics`), loadable offline by users.

`write_eval_results(model_dir, results)` records results in a checkpoint folder: `eval_results.json`, the
`eval_results` of its `metrics.json` and the `model-index` of its re-rendered card, each written atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging

from evaluation.benchmarks import DataFiles, EvalDoc, EvalTask, get_eval_task
from evaluation.evaluate_metrics import load_metric

logger = logging.get_logger(__name__)

# Codex-paper sampling defaults for pass@k with several samples per problem (Chen et al. 2021 use T=0.8 for
# pass@100 and T=0.2 for pass@1; top-p 0.95).
DEFAULT_SAMPLING_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
EVAL_RESULTS_FILE = "eval_results.json"


def _max_length(model: Any, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(getattr(model, "config", None), name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
    return pad


def truncate_at_stops(text: str, stop_sequences: Iterable[str]) -> str:
    """`text` up to the earliest of `stop_sequences` (all of it when none occurs)."""
    end = len(text)
    for stop in stop_sequences:
        index = text.find(stop)
        if index != -1:
            end = min(end, index)
    return text[:end]


# ---------------------------------------------------------------------------------------------------------------
# Generation.


@torch.no_grad()
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float | None = None,
    top_p: float = DEFAULT_TOP_P,
    stop_sequences: Sequence[str] = (),
    seed: int = 0,
    max_length: int | None = None,
) -> list[list[str]]:
    """`num_samples` completions per prompt (greedy when `temperature` is None or 0), cut at `stop_sequences`.

    Prompts are tokenised with the tokenizer's special tokens, left-truncated to fit `max_length - max_new_tokens`,
    sorted by length and generated in left-padded batches (so batching never changes a greedy completion); sampling
    is seeded by `seed` without touching the caller's RNG state.
    """
    if not prompts:
        return []
    do_sample = temperature is not None and temperature > 0
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if num_samples > 1 and not do_sample:
        raise ValueError("num_samples > 1 needs sampling (temperature > 0): greedy samples would all be identical.")
    budget = _max_length(model, max_length) - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's context.")
    encoded = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) > budget:
            logger.warning(
                "A prompt of %d tokens was left-truncated to %d to leave room for generation", len(ids), budget
            )
        encoded.append(ids[-budget:])
    pad_id = _pad_id(tokenizer)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_return_sequences": num_samples,
        "pad_token_id": pad_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if stop_sequences:
        kwargs.update(stop_strings=list(stop_sequences), tokenizer=tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    devices = [model.device] if getattr(model, "device", torch.device("cpu")).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer.pad(
                    {"input_ids": [encoded[i] for i in chunk]}, padding=True, padding_side="left", return_tensors="pt"
                ).to(model.device)
                generated = model.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
                )
                new_tokens = generated[:, batch["input_ids"].shape[1] :]  # (B * num_samples, new)
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for row, text in enumerate(texts):
                    outputs[chunk[row // num_samples]].append(truncate_at_stops(text, stop_sequences))
    finally:
        model.train(was_training)
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# Log-likelihood of continuations (multiple choice).


def _encode(tokenizer: Any, text: str) -> list[int]:
    # lm-eval's HFLM.tok_encode: the tokenizer's own special tokens, unless the text already starts with BOS.
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval computes them (trailing context spaces move to the continuation;
    the continuation is the tail of the whole text's encoding; an empty context becomes the BOS/EOS prefix token)."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """For each (context, continuation): the summed log-probability of the continuation and whether it is greedy.

    Hand-written because no kept library exposes lm-eval's scoring without its task machinery; it follows
    `HFLM._loglikelihood_tokens`: inputs `(context + continuation)[-(max_length + 1):][:-1]`, right-padded batches
    sorted by length, no attention mask (a causal model's earlier positions never see the padding).
    """
    limit = _max_length(model, max_length)
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    for (context, continuation), (_, cont) in zip(requests, pairs, strict=True):
        if not cont:
            raise ValueError(f"The continuation {continuation!r} after {context[-40:]!r} encodes to no tokens.")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[-(limit + 1) :][:-1] for i in chunk]
            width = max(len(ids) for ids in inputs)
            batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for row, ids in enumerate(inputs):
                batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logits = model(input_ids=batch.to(model.device)).logits  # (B, T, V)
            log_probs = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(chunk):
                cont = torch.tensor(pairs[i][1], dtype=torch.long, device=log_probs.device)
                end = len(inputs[row])
                scores = log_probs[row, end - len(cont) : end]  # (len(cont), V): predictions of the continuation
                total = scores.gather(-1, cont[:, None]).sum()
                results[i] = (float(total), bool((scores.argmax(-1) == cont).all()))
    finally:
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Scoring (no model involved: testable with canned outputs).


def score_multiple_choice(
    docs: Sequence[EvalDoc], choice_loglikelihoods: Sequence[Sequence[float]]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`acc` (argmax of the log-likelihoods) and `acc_norm` (of log-likelihood / choice length in characters, as
    lm-eval normalises) with per-document records."""
    preds, preds_norm, golds, samples = [], [], [], []
    for doc, lls in zip(docs, choice_loglikelihoods, strict=True):
        values = np.asarray(lls, dtype=np.float64)
        lengths = np.asarray([float(len(choice)) for choice in doc.choices])
        pred, pred_norm = int(np.argmax(values)), int(np.argmax(values / lengths))
        preds.append(pred)
        preds_norm.append(pred_norm)
        golds.append(doc.gold)
        samples.append({"id": doc.id, "gold": doc.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls})
    accuracy = load_metric("forge_accuracy")
    metrics = {
        "acc": accuracy.compute(predictions=preds, references=golds)["accuracy"],
        "acc_norm": accuracy.compute(predictions=preds_norm, references=golds)["accuracy"],
    }
    return metrics, samples


def score_completions(
    task: EvalTask,
    docs: Sequence[EvalDoc],
    completions: Sequence[Sequence[str]],
    *,
    ks: Iterable[int] = (1,),
    sandbox_limits: Mapping[str, Any] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics of a generative task from its completions (one list per document): exact match or sandbox pass@k.

    Exact match averages over every sample; with several samples per document it also reports pass@k ("some sample
    among k is right"). Code runs only in the sandbox; a sandbox that cannot start raises instead of scoring zero.
    """
    if len(docs) != len(completions):
        raise ValueError(f"Got {len(docs)} documents but {len(completions)} completion lists.")
    ks = sorted(set(ks) | {1})  # pass@1 always: it is the code tasks' primary metric
    samples: list[dict[str, Any]] = []
    if task.mode == "exact_match":
        extracted = [[task.extract_answer(text) for text in texts] for texts in completions]
        verdicts = [[e is not None and e == doc.answer for e in ex] for doc, ex in zip(docs, extracted, strict=True)]
        flat_predictions = [e or "" for ex in extracted for e in ex]  # "" = no answer found, never a match
        flat_references = [doc.answer for doc, texts in zip(docs, completions, strict=True) for _ in texts]
        metrics = load_metric("forge_exact_match").compute(predictions=flat_predictions, references=flat_references)
        if max(len(texts) for texts in completions) > 1:
            metrics.update(load_metric("forge_pass_at_k").compute(predictions=verdicts, k=ks))
        for doc, texts, ex, ok in zip(docs, completions, extracted, verdicts, strict=True):
            samples.append(
                {"id": doc.id, "answer": doc.answer, "completions": list(texts), "extracted": ex, "correct": ok}
            )
        return metrics, samples
    if task.mode != "pass_at_k":
        raise ValueError(f"Task {task.name!r} is scored by {task.mode}, not from completions.")
    from evaluation.sandbox import run_many

    programs = [[task.program(doc, text) for text in texts] for doc, texts in zip(docs, completions, strict=True)]
    jobs = [program for row in programs for program in row if program is not None]
    ran = iter(run_many(jobs, **dict(sandbox_limits or {})))
    statuses = [[next(ran).status if program is not None else "empty" for program in row] for row in programs]
    verdicts = [[status == "passed" for status in row] for row in statuses]
    metrics = load_metric("forge_pass_at_k").compute(predictions=verdicts, k=ks)
    for doc, texts, row_status, ok in zip(docs, completions, statuses, verdicts, strict=True):
        samples.append({"id": doc.id, "completions": list(texts), "status": row_status, "passed": ok})
    return metrics, samples


# ---------------------------------------------------------------------------------------------------------------
# Tasks and suites.


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: str | EvalTask,
    *,
    limit: int | None = None,
    data_files: DataFiles | None = None,
    seed: int = 0,
    batch_size: int = 8,
    num_samples: int = 1,
    ks: Iterable[int] = (1,),
    temperature: float | None = None,
    top_p: float = DEFAULT_TOP_P,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    sandbox_limits: Mapping[str, Any] | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """One task's result: `metrics`, the `primary_metric` and its value as `score`, `n` documents, provenance.

    `num_samples` completions per document for generative tasks (sampled: `temperature` defaults to 0.8 then);
    `ks` the pass@k values reported (each k <= num_samples). Multiple-choice tasks ignore the generation settings.
    """
    task = get_eval_task(task)
    started = time.perf_counter()
    docs = task.docs(limit=limit, data_files=data_files, seed=seed)
    if not docs:
        raise ValueError(f"Eval task {task.name!r} produced no documents (limit={limit}, data_files={data_files}).")
    if task.mode == "multiple_choice":
        requests = [(doc.prompt, task.target_delimiter + choice) for doc in docs for choice in doc.choices]
        scored = iter(loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length))
        per_doc = [[next(scored)[0] for _ in doc.choices] for doc in docs]
        metrics, samples = score_multiple_choice(docs, per_doc)
        num_samples = 1
    else:
        if num_samples > 1 and temperature is None:
            temperature = DEFAULT_SAMPLING_TEMPERATURE
        completions = generate_completions(
            model,
            tokenizer,
            [doc.prompt for doc in docs],
            max_new_tokens=max_new_tokens or task.max_new_tokens,
            batch_size=batch_size,
            num_samples=num_samples,
            temperature=temperature,
            top_p=top_p,
            stop_sequences=task.stop_sequences,
            seed=seed,
            max_length=max_length,
        )
        metrics, samples = score_completions(task, docs, completions, ks=ks, sandbox_limits=sandbox_limits)
    if task.primary_metric not in metrics:
        raise ValueError(f"Task {task.name!r}: primary metric {task.primary_metric!r} missing from {sorted(metrics)}.")
    source = "built-in" if task.dataset.startswith("agent-forge/") else "hub"
    if data_files is not None:
        source = f"local:{','.join(map(str, [data_files] if isinstance(data_files, (str, Path)) else data_files))}"
    result = {
        "task": task.name,
        "mode": task.mode,
        "dataset": task.dataset,
        "split": task.split,
        "options": {key: value for key, value in task.options.items() if value not in ({}, None)},
        "source": source,
        "backend": "agent-forge",
        "n": len(docs),
        "num_samples": num_samples,
        "metrics": {name: float(value) for name, value in metrics.items()},
        "primary_metric": task.primary_metric,
        "score": float(metrics[task.primary_metric]),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if log_samples:
        result["samples"] = samples
    logger.info("%s: %s = %.4f on %d documents", task.name, task.primary_metric, result["score"], len(docs))
    return result


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: str | EvalTask | Sequence[str | EvalTask],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_files: Mapping[str, DataFiles] | None = None,
    seed: int = 0,
    **task_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate on several tasks; returns `{task name: evaluate_task result}` (metrics, score, n, provenance).

    `data_files` maps task names to local files (for Hub benchmarks offline); `task_kwargs` go to `evaluate_task`
    (num_samples, ks, temperature, max_new_tokens, sandbox_limits, log_samples, ...). Task names must be distinct.
    """
    tasks = [tasks] if isinstance(tasks, (str, EvalTask)) else list(tasks)
    resolved = [get_eval_task(task) for task in tasks]
    names = [task.name for task in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"Task names repeat in {names}; give variants distinct EvalTask names.")
    data_files = dict(data_files or {})
    unknown = sorted(set(data_files) - set(names))
    if unknown:
        raise ValueError(f"data_files names tasks that are not evaluated: {unknown} (tasks: {names}).")
    results = {}
    for task in resolved:
        results[task.name] = evaluate_task(
            model,
            tokenizer,
            task,
            limit=limit,
            data_files=data_files.get(task.name),
            seed=seed,
            batch_size=batch_size,
            **task_kwargs,
        )
    return results


def evaluate_folder(
    model_dir: str | Path,
    tasks: str | EvalTask | Sequence[str | EvalTask],
    *,
    backend: str = "agent-forge",
    device: str = "cpu",
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate a checkpoint folder (loaded with `trust_remote_code=True`) with our harness or, `backend="lm-eval"`,
    with lm-evaluation-harness on the same documents; `kwargs` go to `evaluate_model` or `run_lm_eval`."""
    if backend == "lm-eval":
        from evaluation.lm_eval_adapter import run_lm_eval

        tasks = [tasks] if isinstance(tasks, (str, EvalTask)) else list(tasks)
        return run_lm_eval(model_dir, tasks, device=device, **kwargs)
    if backend != "agent-forge":
        raise ValueError(f"Unknown backend {backend!r}; use 'agent-forge' (this harness) or 'lm-eval'.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    return evaluate_model(model, tokenizer, tasks, **kwargs)


def composite_score(results: Mapping[str, Mapping[str, Any]], weights: Mapping[str, float]) -> float:
    """Weighted mean of the tasks' primary scores (weights normalised to sum 1); every weighted task must be there."""
    missing = sorted(set(weights) - set(results))
    if missing:
        raise ValueError(f"No results for weighted tasks {missing}; evaluate them first (have: {sorted(results)}).")
    if any(weight < 0 for weight in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"Weights must be non-negative with a positive sum, got {dict(weights)}.")
    total = sum(weights.values())
    return float(sum(weight * float(results[name]["score"]) for name, weight in weights.items()) / total)


def results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of the results: task, backend, n, every metric, seconds."""
    lines = ["| task | backend | n | metric | value | seconds |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        for metric, value in result["metrics"].items():
            star = " *" if metric == result.get("primary_metric") else ""
            seconds = result.get("seconds", "")
            lines.append(
                f"| {name} | {result.get('backend', '')} | {result['n']} | {metric}{star} | {value:.4f} | {seconds} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Recording results in a checkpoint folder.


def _write_atomic(path: Path, text: str) -> None:
    # Temp file in the same folder + os.replace: readers see the old file or the new one, never a partial one.
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8")
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def eval_results_entries(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The `metrics.json` `eval_results` entries (the card's model-index) for every metric of every task."""
    entries = []
    for name, result in results.items():
        origin = "local files" if str(result.get("source", "")).startswith("local:") else result.get("source", "")
        for metric, value in result["metrics"].items():
            entries.append({
                "task": name,
                "backend": result.get("backend", "agent-forge"),
                "dataset": result["dataset"],
                "dataset_name": f"{name} ({origin}, n={result['n']})",
                "split": result["split"],
                "metric": metric,
                "metric_name": f"{metric} ({result.get('backend', 'agent-forge')})",
                "value": float(value),
                "task_type": "text-generation",
            })  # fmt: skip
    return entries


def write_eval_results(model_dir: str | Path, results: Mapping[str, Mapping[str, Any]]) -> Path:
    """Record `results` in a checkpoint folder: `eval_results.json`, `metrics.json`'s `eval_results` and the card.

    Results merge with earlier ones by task name (a re-run of a task replaces its entries). The card is re-rendered
    only where the folder has the lineage a card needs (`forge_lineage.json`). Every file is replaced atomically.
    """
    from hub_cards import render_card

    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    clean = {name: {k: v for k, v in result.items() if k != "samples"} for name, result in results.items()}
    path = folder / EVAL_RESULTS_FILE
    previous = json.loads(path.read_text())["results"] if path.exists() else {}
    merged = {**previous, **clean}
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    _write_atomic(path, json.dumps({"updated": created, "results": merged}, indent=2) + "\n")

    metrics_path = folder / "metrics.json"
    payload = json.loads(metrics_path.read_text()) if metrics_path.exists() else {"metrics": {}, "eval_results": []}
    new_entries = eval_results_entries(clean)

    def key(entry: Mapping[str, Any]) -> tuple:
        return entry.get("task"), entry.get("split"), entry.get("metric"), entry.get("backend")

    replaced = {key(entry) for entry in new_entries}
    payload["eval_results"] = [e for e in payload.get("eval_results", []) if key(e) not in replaced] + new_entries
    _write_atomic(metrics_path, json.dumps(payload, indent=2, default=str) + "\n")

    if (folder / "forge_lineage.json").exists():
        _write_atomic(folder / "README.md", str(render_card(folder)))
    else:
        logger.warning("%s has no forge_lineage.json, so its model card was not re-rendered", folder)
    return path


__all__ = [
    "EVAL_RESULTS_FILE",
    "composite_score",
    "encode_pair",
    "eval_results_entries",
    "evaluate_folder",
    "evaluate_model",
    "evaluate_task",
    "generate_completions",
    "loglikelihoods",
    "results_table",
    "score_completions",
    "score_multiple_choice",
    "truncate_at_stops",
    "write_eval_results",
]
