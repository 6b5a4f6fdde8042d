"""The shared contract of the built-in task families: `Example`, `TaskFamily` and structural split assignment.

A family turns a seeded random draw into self-contained, plain-text examples (no tokenizer involved) and scores
completions exactly. Splits never overlap by construction: every candidate problem is assigned to "train",
"validation" or "test" by a SHA-256 hash of its *canonical key* (the content that defines the problem, with
cosmetic choices such as person names left out), and `generate` draws with rejection until it holds `n` distinct
examples of the requested split. The same problem can therefore never land in two splits, whatever the seed,
the difficulty or the number of examples asked for.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

SPLITS = ("train", "validation", "test")
# Share of the problem space that each split owns (cumulative thresholds over a uniform hash in [0, 1)).
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
MIN_DIFFICULTY = 1
MAX_DIFFICULTY = 10


@dataclass(frozen=True)
class Example:
    """One generated problem: what the model sees, what it should produce, and how to score it."""

    family: str
    prompt: str
    target: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    @property
    def key(self) -> str:
        """The canonical key that decided this example's split (also used for deduplication)."""
        return self.meta["canonical_key"]


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of `parts` that is identical across processes and machines (unlike the salted `hash()`)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_for_key(family: str, key: str) -> str:
    """The split that owns the problem with canonical `key` in `family`: a pure function of the content."""
    position = stable_hash("split", family, key) / 2**64
    cumulative = 0.0
    for split in SPLITS:
        cumulative += SPLIT_FRACTIONS[split]
        if position < cumulative:
            return split
    return SPLITS[-1]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")


def _check_difficulty(difficulty: int) -> None:
    if not isinstance(difficulty, int) or not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be an integer in [{MIN_DIFFICULTY}, {MAX_DIFFICULTY}], got {difficulty!r}.")


class TaskFamily(ABC):
    """A seeded generator of plain-text problems plus its exact scorer.

    Subclasses implement `sample` (one random candidate at a difficulty) and `extract_answer`; the base class
    provides deterministic, split-disjoint, deduplicated generation and the default scoring loop.
    """

    name: str = ""
    # Rejection sampling gives up after this many candidates per requested example (plus a fixed allowance), or
    # after `max_stall` candidates in a row brought nothing new, so a difficulty whose problem space is too small
    # for `n` fails loudly instead of looping forever.
    max_attempts_per_example: int = 200
    max_stall: int = 20_000

    @abstractmethod
    def sample(self, rng: random.Random, difficulty: int) -> Example:
        """Draw one candidate problem; its `meta` must hold a `canonical_key`."""

    def propose(self, rng: random.Random, difficulty: int) -> tuple[str, Callable[[], Example]]:
        """A candidate's canonical key and a function that renders it; override to skip rendering rejected ones."""
        example = self.sample(rng, difficulty)
        return example.key, lambda: example

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The canonical final answer written in `completion`, or None when it is malformed (never raises)."""

    def config_fingerprint(self) -> str:
        """Constructor options that change what `sample` draws; mixed into the seed so configs do not collide."""
        return ""

    def rng_for(self, split: str, seed: int, difficulty: int) -> random.Random:
        """The random stream for one `generate` call: fixed by family, options, split, seed and difficulty."""
        return random.Random(stable_hash(self.name, self.config_fingerprint(), split, seed, difficulty))

    def generate(self, split: str, n: int, seed: int = 0, difficulty: int = 1) -> list[Example]:
        """`n` distinct examples of `split`, deterministic per (split, n, seed, difficulty); smaller n: a prefix."""
        _check_split(split)
        _check_difficulty(difficulty)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        rng = self.rng_for(split, seed, difficulty)
        examples: list[Example] = []
        seen: set[str] = set()
        budget = self.max_attempts_per_example * n + 1000
        attempts = stall = 0
        while len(examples) < n:
            if attempts >= budget or stall >= self.max_stall:
                raise ValueError(
                    f"{self.name}: found only {len(examples)} distinct {split!r} examples at difficulty {difficulty} "
                    f"after {attempts} draws (asked for {n}); the problem space at this difficulty is too small. "
                    "Ask for fewer examples or use a higher difficulty."
                )
            attempts += 1
            stall += 1
            key, render = self.propose(rng, difficulty)
            if key in seen or split_for_key(self.name, key) != split:
                continue
            seen.add(key)
            stall = 0
            candidate = render()
            candidate.meta["split"] = split
            examples.append(candidate)
        logger.debug("%s: %d %s examples at difficulty %d from %d draws", self.name, n, split, difficulty, attempts)
        return examples

    def score(self, example: Example, completion: str) -> float:
        """1.0 when the answer extracted from `completion` equals the example's answer, else 0.0 (never raises)."""
        try:
            predicted = self.extract_answer(completion)
        except Exception:  # a scorer must survive any model output
            logger.debug("%s: extract_answer raised on a completion", self.name, exc_info=True)
            return 0.0
        return 1.0 if predicted is not None and predicted == example.answer else 0.0

    def score_batch(self, examples: Sequence[Example], completions: Sequence[str]) -> list[float]:
        """Scores for aligned lists of examples and completions."""
        if len(examples) != len(completions):
            raise ValueError(f"Got {len(examples)} examples but {len(completions)} completions.")
        return [self.score(example, completion) for example, completion in zip(examples, completions, strict=True)]

    def training_text(self, example: Example) -> str:
        """The string to pretrain on: the prompt followed by the reference completion."""
        return example.prompt + example.target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
