"""Real datasets a user trains on: a registry of Hugging Face Hub ids with their fields and plain-text formatting.

    from evaluation.data_sources import DATA_SOURCES, load_data_source

    stories = load_data_source("tinystories", "train", streaming=True, max_examples=10_000)  # needs the Hub
    local = load_data_source("gsm8k", "train", data_files="gsm8k_train.jsonl")               # works offline

Every source maps one row to one training text with a small, named formatting function (tested on hand-made
rows), so the same formatting applies to Hub rows and to local `json`/`jsonl`/`parquet`/`csv`/`txt` files that carry
the same fields. In offline mode (`HF_HUB_OFFLINE=1` or `HF_DATASETS_OFFLINE=1`) a Hub source is served from the
local `datasets` cache when it is there and otherwise fails at once with `DataSourceUnavailableError`, which names
the dataset and the fixes (the built-in task families in `evaluation.tasks`, or local files); it never waits on
the network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

logger = logging.get_logger(__name__)

_TRUE_VALUES = {"1", "on", "yes", "true"}
# `load_dataset` builder for each local file suffix.
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class DataSourceUnavailableError(RuntimeError):
    """A Hub dataset cannot be loaded here (offline and not cached); the message says how to proceed."""


# ---------------------------------------------------------------------------------------------------------------
# Formatting functions: one row (a dict of the source's fields) -> one plain training text.


def format_text(row: dict[str, Any]) -> str:
    """Sources that already are plain text (`text` field)."""
    return str(row["text"]).strip()


def format_titled_text(row: dict[str, Any]) -> str:
    """Encyclopedia articles: the title on its own line, then the article."""
    return f"{str(row['title']).strip()}\n\n{str(row['text']).strip()}"


_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def format_gsm8k(row: dict[str, Any]) -> str:
    """GSM8K: `Question: ...\\nAnswer:\\n<worked solution ending in #### N>`, calculator annotations `<<...>>` removed.

    The layout matches the built-in `arithmetic` family, so real and generated problems read the same.
    """
    answer = _CALCULATOR_ANNOTATION.sub("", str(row["answer"])).strip()
    return f"Question: {str(row['question']).strip()}\nAnswer:\n{answer}"


def format_question_answer(row: dict[str, Any]) -> str:
    """MetaMathQA-style rows (`query`, `response`) in the same Question/Answer layout as GSM8K."""
    return f"Question: {str(row['query']).strip()}\nAnswer:\n{str(row['response']).strip()}"


def format_math_solution(row: dict[str, Any]) -> str:
    """Competition math (`problem`, `solution`)."""
    return f"Problem: {str(row['problem']).strip()}\nSolution: {str(row['solution']).strip()}"


def format_mbpp(row: dict[str, Any]) -> str:
    """MBPP: the task as a comment, the reference code, then its assert tests (newlines normalised)."""
    code = str(row["code"]).replace("\r\n", "\n").strip()
    tests = "\n".join(str(test).strip() for test in row.get("test_list") or [])
    text = f"# {str(row['text']).strip()}\n{code}\n"
    return text + (f"{tests}\n" if tests else "")


def format_humaneval(row: dict[str, Any]) -> str:
    """HumanEval: the prompt (signature and docstring) followed by the canonical body."""
    return str(row["prompt"]) + str(row["canonical_solution"])


def format_instruction(row: dict[str, Any]) -> str:
    """Alpaca-style rows (`instruction`, optional `input`, `output`)."""
    parts = [f"Instruction: {str(row['instruction']).strip()}"]
    if str(row.get("input") or "").strip():
        parts.append(f"Input: {str(row['input']).strip()}")
    parts.append(f"Response: {str(row['output']).strip()}")
    return "\n".join(parts)


def _lettered(choices: Sequence[str], labels: Sequence[str]) -> str:
    return "\n".join(f"{label}. {str(choice).strip()}" for label, choice in zip(labels, choices, strict=True))


def format_arc(row: dict[str, Any]) -> str:
    """ARC: the question, the lettered choices and `Answer: <label>. <text>`."""
    labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
    key = str(row["answerKey"])
    answer = f"{key}. {str(texts[labels.index(key)]).strip()}" if key in labels else key
    return f"Question: {str(row['question']).strip()}\n{_lettered(texts, labels)}\nAnswer: {answer}"


def format_mmlu(row: dict[str, Any]) -> str:
    """MMLU: the question, choices A-D and `Answer: <letter>. <text>` (`answer` is the choice index)."""
    choices = list(row["choices"])
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    index = int(row["answer"])
    return (
        f"Question: {str(row['question']).strip()}\n{_lettered(choices, labels)}\n"
        f"Answer: {labels[index]}. {str(choices[index]).strip()}"
    )


def format_hellaswag(row: dict[str, Any]) -> str:
    """HellaSwag: the context continued by its correct ending (the context alone where the label is hidden)."""
    context = f"{str(row['activity_label']).strip()}: {str(row['ctx']).strip()}"
    label = str(row.get("label", "")).strip()
    if not label:
        return context
    return f"{context} {str(row['endings'][int(label)]).strip()}"


# ---------------------------------------------------------------------------------------------------------------
# The registry.


@dataclass(frozen=True)
class DataSource:
    """One real dataset: where it lives on the Hub, which fields it needs and how a row becomes training text."""

    name: str
    hub_id: str
    config: str | None
    fields: tuple[str, ...]
    format: Callable[[dict[str, Any]], str]
    splits: tuple[str, ...]
    domain: str  # stories | encyclopedia | web | math | code | instructions | benchmark
    description: str
    revision: str | None = None

    def format_row(self, row: dict[str, Any]) -> str:
        """The training text for one row, with an error that names the missing fields instead of a bare KeyError."""
        missing = [field for field in self.fields if field not in row]
        if missing:
            raise ValueError(
                f"Data source {self.name!r} needs the fields {list(self.fields)}; the row lacks {missing} "
                f"(it has {sorted(row)})."
            )
        return self.format(row)


DATA_SOURCES: dict[str, DataSource] = {
    source.name: source
    for source in (
        DataSource("tinystories", "roneneldan/TinyStories", None, ("text",), format_text, ("train", "validation"),
                   "stories", "Short synthetic stories in simple English (Eldan & Li, 2023)."),
        DataSource("gsm8k", "openai/gsm8k", "main", ("question", "answer"), format_gsm8k, ("train", "test"),
                   "math", "Grade-school math word problems with worked solutions ending in `#### N`."),
        DataSource("metamathqa", "meta-math/MetaMathQA", None, ("query", "response"), format_question_answer,
                   ("train",), "math", "Augmented GSM8K/MATH questions with step-by-step answers."),
        DataSource("math-500", "HuggingFaceH4/MATH-500", None, ("problem", "solution"), format_math_solution,
                   ("test",), "benchmark", "500 competition problems from the MATH test set."),
        DataSource("mbpp", "google-research-datasets/mbpp", "full", ("text", "code", "test_list"), format_mbpp,
                   ("train", "validation", "test", "prompt"), "code",
                   "Mostly Basic Python Problems: a task, a reference solution and assert tests."),
        DataSource("humaneval", "openai/openai_humaneval", None, ("prompt", "canonical_solution"), format_humaneval,
                   ("test",), "benchmark", "164 hand-written Python functions with docstrings and tests."),
        DataSource("codealpaca", "sahil2801/CodeAlpaca-20k", None, ("instruction", "input", "output"),
                   format_instruction, ("train",), "code", "20k code instructions with answers."),
        DataSource("alpaca", "tatsu-lab/alpaca", None, ("instruction", "input", "output"), format_instruction,
                   ("train",), "instructions", "52k general instructions with answers (Stanford Alpaca)."),
        DataSource("wikipedia", "wikimedia/wikipedia", "20231101.en", ("title", "text"), format_titled_text,
                   ("train",), "encyclopedia", "English Wikipedia, 2023-11-01 dump."),
        DataSource("wikitext", "Salesforce/wikitext", "wikitext-103-raw-v1", ("text",), format_text,
                   ("train", "validation", "test"), "encyclopedia",
                   "WikiText-103 (raw): good and featured Wikipedia articles, one line per row."),
        DataSource("openwebtext", "Skylion007/openwebtext", None, ("text",), format_text, ("train",), "web",
                   "Open reproduction of GPT-2's WebText corpus."),
        DataSource("fineweb-edu", "HuggingFaceFW/fineweb-edu", "sample-10BT", ("text",), format_text, ("train",),
                   "web", "Educational web pages filtered from FineWeb, 10B-token sample."),
        DataSource("arc-easy", "allenai/ai2_arc", "ARC-Easy", ("question", "choices", "answerKey"), format_arc,
                   ("train", "validation", "test"), "benchmark", "AI2 Reasoning Challenge, easy set."),
        DataSource("arc-challenge", "allenai/ai2_arc", "ARC-Challenge", ("question", "choices", "answerKey"),
                   format_arc, ("train", "validation", "test"), "benchmark", "AI2 Reasoning Challenge, hard set."),
        DataSource("hellaswag", "Rowan/hellaswag", None, ("activity_label", "ctx", "endings", "label"),
                   format_hellaswag, ("train", "validation", "test"), "benchmark",
                   "Commonsense sentence completion (test labels are hidden)."),
        DataSource("mmlu", "cais/mmlu", "all", ("question", "choices", "answer"), format_mmlu,
                   ("test", "validation", "dev", "auxiliary_train"), "benchmark",
                   "Massive Multitask Language Understanding, 57 subjects."),
    )
}  # fmt: skip


def get_data_source(name: str) -> DataSource:
    """The registered source `name` (raises a ValueError listing the known names)."""
    if name not in DATA_SOURCES:
        raise ValueError(
            f"Unknown data source {name!r}; known sources: {', '.join(sorted(DATA_SOURCES))}. For generated data "
            "use the built-in task families (evaluation.tasks.get_task_family)."
        )
    return DATA_SOURCES[name]


def hub_offline() -> bool:
    """Whether Hub access is switched off, by the environment now or by `datasets` at its import."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE_VALUES:
            return True
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _offline_error(source: DataSource, split: str, reason: str) -> DataSourceUnavailableError:
    config = f", config {source.config!r}" if source.config else ""
    return DataSourceUnavailableError(
        f"Cannot load data source {source.name!r} (Hub dataset {source.hub_id!r}{config}, split {split!r}): {reason}. "
        "Fix: train on the built-in task families (evaluation.tasks: arithmetic, kv_recall, code) or the built-in "
        f"corpus, or pass local files: load_data_source({source.name!r}, {split!r}, data_files='rows.jsonl') with "
        f"rows that carry the fields {list(source.fields)} (json, jsonl, parquet, csv or txt). Or unset "
        "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE where the Hub is reachable."
    )


def local_builder(data_files: str | Path | Sequence[str | Path]) -> tuple[str, list[str]]:
    """The `datasets` builder name (json, parquet, csv, text) and file list for local files of one format."""
    files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    if not files:
        raise ValueError("data_files is empty. Fix: pass a path or a list of paths.")
    suffixes = {Path(file).suffix.lower() for file in files}
    builders = {LOCAL_BUILDERS.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"Cannot infer one file format from suffixes {sorted(suffixes)}; use files of one kind among "
            f"{', '.join(sorted(LOCAL_BUILDERS))}."
        )
    missing = [str(file) for file in files if not Path(file).exists()]
    if missing:
        raise FileNotFoundError(f"Local data files not found: {missing}.")
    return builders.pop(), [str(file) for file in files]


def load_data_source(
    name: str,
    split: str = "train",
    *,
    streaming: bool = False,
    max_examples: int | None = None,
    data_files: str | Path | Sequence[str | Path] | None = None,
    cache_dir: str | Path | None = None,
) -> Dataset | IterableDataset:
    """A dataset with one `text` column: the source's rows formatted to training text (empty texts dropped).

    Reads the Hub dataset, or `data_files` (local json/jsonl/parquet/csv/txt with the source's fields) when given.
    `max_examples` caps the rows read. Offline, a Hub source not in the local cache raises
    `DataSourceUnavailableError` at once.
    """
    import datasets

    source = get_data_source(name)
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}.")
    cache = str(cache_dir) if cache_dir is not None else None
    if data_files is not None:
        builder, files = local_builder(data_files)
        dataset = datasets.load_dataset(
            builder, data_files={split: files}, split=split, streaming=streaming, cache_dir=cache
        )
        origin = f"local files {files}"
    else:
        if split not in source.splits:
            raise ValueError(
                f"Data source {name!r} ({source.hub_id}) has no split {split!r}; "
                f"its splits: {', '.join(source.splits)}."
            )
        kwargs: dict[str, Any] = {"split": split, "streaming": streaming, "cache_dir": cache}
        if source.revision:
            kwargs["revision"] = source.revision
        if hub_offline():
            if not datasets.config.HF_HUB_OFFLINE:
                # Offline was switched on after `datasets` was imported, so `datasets` would still try the network.
                raise _offline_error(source, split, "offline mode is on and `datasets` cannot be told so any more")
            try:
                dataset = datasets.load_dataset(source.hub_id, source.config, **kwargs)
            except Exception as err:  # offline, any failure means "not in the local cache"
                raise _offline_error(source, split, f"offline mode is on and it is not cached ({err})") from err
        else:
            dataset = datasets.load_dataset(source.hub_id, source.config, **kwargs)
        origin = source.hub_id
    if max_examples is not None:
        dataset = dataset.take(max_examples) if streaming else dataset.select(range(min(max_examples, len(dataset))))
    columns = dataset.column_names
    if columns is not None:
        missing = [field for field in source.fields if field not in columns]
        if missing:
            raise ValueError(
                f"Rows from {origin} lack the fields {missing} that data source {name!r} formats (they have "
                f"{columns}). Fix: rename the columns or pick the source whose fields match."
            )

    def to_text(row: dict[str, Any]) -> dict[str, str]:
        return {"text": source.format_row(row)}

    if columns is not None:
        dataset = dataset.map(to_text, remove_columns=columns)
    else:
        dataset = dataset.map(to_text).select_columns(["text"])
    dataset = dataset.filter(lambda row: bool(row["text"].strip()))
    logger.info("Loaded data source %r split %r from %s", name, split, origin)
    return dataset


__all__ = [
    "DATA_SOURCES",
    "DataSource",
    "DataSourceUnavailableError",
    "get_data_source",
    "hub_offline",
    "load_data_source",
]
