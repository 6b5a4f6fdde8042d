"""The registry of real datasets: formatting on hand-made rows, fast offline failure, local files. No network."""

import json
import time

import datasets
import pytest

from evaluation import data_sources
from evaluation.data_sources import (
    DATA_SOURCES,
    DataSourceUnavailableError,
    format_arc,
    format_gsm8k,
    format_hellaswag,
    format_humaneval,
    format_instruction,
    format_mbpp,
    format_mmlu,
    get_data_source,
    load_data_source,
)

# One hand-made row per source, shaped like the Hub rows (field names and types).
ROWS = {
    "tinystories": {"text": "Once upon a time, a cat sat.  "},
    "gsm8k": {"question": "Tom has 3 bags of 4 apples. How many?", "answer": "3 * 4 = <<3*4=12>>12\n#### 12"},
    "metamathqa": {"query": "What is 2 + 2?", "response": "2 + 2 = 4. The answer is: 4", "type": "GSM_Rephrased"},
    "math-500": {"problem": "Solve x + 1 = 3.", "solution": "x = 2, so $\\boxed{2}$.", "answer": "2"},
    "mbpp": {
        "task_id": 2,
        "text": "Write a function to add one.",
        "code": "def add_one(x):\r\n    return x + 1",
        "test_list": ["assert add_one(1) == 2", "assert add_one(0) == 1"],
    },
    "humaneval": {
        "task_id": "HumanEval/0",
        "prompt": 'def f(x):\n    """Add one."""\n',
        "canonical_solution": "    return x + 1\n",
        "entry_point": "f",
    },
    "codealpaca": {"instruction": "Reverse a list in Python.", "input": "", "output": "xs[::-1]"},
    "alpaca": {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"},
    "wikipedia": {"id": "1", "url": "u", "title": "Anarchism", "text": "Anarchism is a political philosophy."},
    "wikitext": {"text": " = Valkyria Chronicles = \n"},
    "openwebtext": {"text": "Web page text."},
    "fineweb-edu": {"text": "Photosynthesis turns light into chemical energy.", "score": 3.1},
    "arc-easy": {
        "id": "q1",
        "question": "Which is a mammal?",
        "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    },
    "arc-challenge": {
        "id": "q2",
        "question": "What melts ice fastest?",
        "choices": {"text": ["salt", "sand"], "label": ["1", "2"]},
        "answerKey": "1",
    },
    "hellaswag": {
        "activity_label": "Baking cookies",
        "ctx": "A woman mixes dough in a bowl. She",
        "endings": ["flies away.", "puts the dough on a tray.", "sings.", "sleeps."],
        "label": "1",
    },
    "mmlu": {"question": "2 + 3 = ?", "subject": "math", "choices": ["4", "5", "6", "7"], "answer": 1},
}


def test_registry_is_complete_and_well_formed():
    assert 8 <= len(DATA_SOURCES) <= 16
    assert set(ROWS) == set(DATA_SOURCES)
    for name, source in DATA_SOURCES.items():
        assert source.name == name and "/" in source.hub_id and source.fields and source.splits
    expected_ids = {
        "tinystories": "roneneldan/TinyStories",
        "gsm8k": "openai/gsm8k",
        "mbpp": "google-research-datasets/mbpp",
        "humaneval": "openai/openai_humaneval",
        "wikipedia": "wikimedia/wikipedia",
    }
    assert {name: DATA_SOURCES[name].hub_id for name in expected_ids} == expected_ids
    assert DATA_SOURCES["gsm8k"].config == "main" and DATA_SOURCES["wikipedia"].config == "20231101.en"


def test_unknown_source_error_lists_the_known_names():
    with pytest.raises(ValueError, match="gsm8k.*tinystories"):
        get_data_source("the-pile")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_source_formats_its_hand_made_row(name):
    source = DATA_SOURCES[name]
    text = source.format_row(ROWS[name])
    assert isinstance(text, str) and text.strip()
    if source.domain not in ("code",) and name != "humaneval":
        assert text == text.strip(), "prose sources carry no stray surrounding whitespace"
    # The content of every text field the source needs appears in the training text.
    for field in source.fields:
        value = ROWS[name][field]
        if isinstance(value, str) and value.strip() and field not in ("answerKey", "label"):
            assert value.strip().split("\n")[0].replace("<<3*4=12>>", "").strip() in text


def test_format_gsm8k_strips_calculator_annotations_and_keeps_the_final_answer():
    text = format_gsm8k(ROWS["gsm8k"])
    assert text == "Question: Tom has 3 bags of 4 apples. How many?\nAnswer:\n3 * 4 = 12\n#### 12"


def test_format_mbpp_and_humaneval_give_runnable_layouts():
    assert format_mbpp(ROWS["mbpp"]) == (
        "# Write a function to add one.\ndef add_one(x):\n    return x + 1\n"
        "assert add_one(1) == 2\nassert add_one(0) == 1\n"
    )
    assert format_humaneval(ROWS["humaneval"]) == 'def f(x):\n    """Add one."""\n    return x + 1\n'


def test_format_multiple_choice_sources_name_the_right_answer():
    assert format_arc(ROWS["arc-easy"]).endswith("A. shark\nB. whale\nC. trout\nAnswer: B. whale")
    assert format_arc(ROWS["arc-challenge"]).endswith("Answer: 1. salt")
    assert format_mmlu(ROWS["mmlu"]) == "Question: 2 + 3 = ?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: B. 5"
    assert format_hellaswag(ROWS["hellaswag"]) == (
        "Baking cookies: A woman mixes dough in a bowl. She puts the dough on a tray."
    )
    hidden = {**ROWS["hellaswag"], "label": ""}
    assert format_hellaswag(hidden) == "Baking cookies: A woman mixes dough in a bowl. She"


def test_format_instruction_omits_an_empty_input():
    assert format_instruction(ROWS["codealpaca"]) == "Instruction: Reverse a list in Python.\nResponse: xs[::-1]"
    assert format_instruction(ROWS["alpaca"]) == "Instruction: Translate to French.\nInput: Hello\nResponse: Bonjour"


def test_format_row_names_missing_fields():
    with pytest.raises(ValueError, match=r"gsm8k.*\['answer'\]"):
        DATA_SOURCES["gsm8k"].format_row({"question": "q"})


# -- loading ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tinystories", "gsm8k", "wikipedia"])
def test_offline_hub_source_fails_fast_with_the_fix(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = DATA_SOURCES[name]
    start = time.perf_counter()
    with pytest.raises(DataSourceUnavailableError) as info:
        load_data_source(name, source.splits[0], cache_dir=tmp_path)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert source.hub_id in message and "data_files" in message and "evaluation.tasks" in message


def test_offline_switched_on_after_import_never_reaches_load_dataset(monkeypatch):
    """`datasets` reads the offline flag at import; if it missed it, we must not call the Hub at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset must not be called")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(DataSourceUnavailableError, match="roneneldan/TinyStories"):
        load_data_source("tinystories", "train")
    assert data_sources.hub_offline()


def test_missing_split_is_rejected_before_any_download():
    with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
        load_data_source("gsm8k", "validation")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_local_jsonl_file_is_formatted_like_the_hub_rows(tmp_path):
    rows = [
        {"question": f"Sam has {i} pens and buys 2 more. How many?", "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n"
         f"#### {i + 2}"}
        for i in range(6)
    ]  # fmt: skip
    path = _write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    dataset = load_data_source("gsm8k", "train", data_files=path, cache_dir=tmp_path / "cache")
    assert dataset.column_names == ["text"]
    assert dataset["text"] == [format_gsm8k(row) for row in rows]
    assert dataset["text"][0] == "Question: Sam has 0 pens and buys 2 more. How many?\nAnswer:\n0 + 2 = 2\n#### 2"

    capped = load_data_source("gsm8k", "test", data_files=[path], max_examples=2, cache_dir=tmp_path / "cache")
    assert capped["text"] == [format_gsm8k(row) for row in rows[:2]]

    streamed = load_data_source("gsm8k", "train", data_files=str(path), streaming=True, max_examples=3)
    assert [row["text"] for row in streamed] == [format_gsm8k(row) for row in rows[:3]]


def test_local_text_and_parquet_files(tmp_path):
    (tmp_path / "stories.txt").write_text("One day a dog ran.\n\nThe end came soon.\n")
    stories = load_data_source("tinystories", "train", data_files=tmp_path / "stories.txt", cache_dir=tmp_path / "c")
    assert stories["text"] == ["One day a dog ran.", "The end came soon."]  # the empty line is dropped

    rows = [ROWS["mmlu"], {**ROWS["mmlu"], "answer": 3}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mmlu.parquet"))
    mmlu = load_data_source("mmlu", "test", data_files=tmp_path / "mmlu.parquet", cache_dir=tmp_path / "c")
    assert [text.rsplit("\n", 1)[1] for text in mmlu["text"]] == ["Answer: B. 5", "Answer: D. 7"]


def test_local_rows_without_the_source_fields_get_a_clear_error(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match=r"lack the fields \['question', 'answer'\]"):
        load_data_source("gsm8k", "train", data_files=path, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="suffix"):
        load_data_source("gsm8k", "train", data_files=tmp_path / "rows.xml")
