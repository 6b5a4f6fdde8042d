"""Built-in, offline, seeded task families: the data every phase trains and evaluates on without the Hub.

    from evaluation.tasks import get_task_family

    family = get_task_family("arithmetic")
    examples = family.generate("train", 100, seed=0, difficulty=3)
    texts = [family.training_text(example) for example in examples]
    scores = family.score_batch(examples, completions)

    long_recall = get_task_family("kv_recall", distance_words=1500)  # options build a new instance

Families: `arithmetic` (GSM8K-style word problems with worked solutions), `kv_recall` (key-value recall over a
controlled distance), `code` (HumanEval-style functions scored in the sandbox) and `variable_chain` (follow shuffled
`x=y` assignments to a digit: a probe of serial depth).
"""

from __future__ import annotations

from typing import Any

from evaluation.tasks.arithmetic import ArithmeticFamily
from evaluation.tasks.base import MAX_DIFFICULTY, MIN_DIFFICULTY, SPLITS, Example, TaskFamily, split_for_key
from evaluation.tasks.code import CodeFamily
from evaluation.tasks.kv_recall import KVRecallFamily
from evaluation.tasks.variable_chain import VariableChainFamily

TASK_FAMILIES: dict[str, TaskFamily] = {
    family.name: family for family in (ArithmeticFamily(), KVRecallFamily(), CodeFamily(), VariableChainFamily())
}


def get_task_family(name: str, **options: Any) -> TaskFamily:
    """The registered family `name`; with `options`, a new instance of it built with those constructor options."""
    if name not in TASK_FAMILIES:
        raise ValueError(f"Unknown task family {name!r}; known families: {', '.join(sorted(TASK_FAMILIES))}.")
    family = TASK_FAMILIES[name]
    return type(family)(**options) if options else family


__all__ = [
    "MAX_DIFFICULTY",
    "MIN_DIFFICULTY",
    "SPLITS",
    "TASK_FAMILIES",
    "ArithmeticFamily",
    "CodeFamily",
    "Example",
    "KVRecallFamily",
    "TaskFamily",
    "VariableChainFamily",
    "get_task_family",
    "split_for_key",
]
