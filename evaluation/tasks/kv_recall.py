"""Key-value recall across a controlled distance: a probe of long-term memory beyond the attention window.

The prompt lists `key: value` pairs (keys are hyphenated pseudo-words such as `kav-mol`, values are integers),
then neutral filler, then asks for one key's value:

    Remember the value of each key.
    kav-mol: 4821
    rit-suh: 193
    The quiet river waits near the old bridge. A lantern glows softly. ...
    Question: What is the value of kav-mol?
    Answer:

The *distance* is the number of whitespace-separated words between the queried value and `Question:` (the pairs
listed after the queried one count, two words each). It is honoured exactly: the queried pair is placed so that
the pairs after it fit inside the distance and the filler makes up the rest. `meta` records the actual distance
and the character spans of the queried value and of the question, so training code can convert them to tokens
with any tokenizer's offset mapping and pick a distance larger than the model's attention window.

Filler choice: generated sentences from a small fixed English word list (`FILLER_*`). It contains no digits and no
hyphens, so it can never contain a value or a key (and therefore never the answer); distractor pairs would make
the task harder in a way that the number of pairs already controls.

Difficulty levels (pairs / default distance in words / digits per value):

| level | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | 10 |
|---|---|---|---|---|---|---|---|---|---|---|
| pairs | 2 | 3 | 4 | 5 | 6 | 8 | 10 | 12 | 14 | 16 |
| distance | 10 | 25 | 50 | 100 | 200 | 350 | 500 | 750 | 1000 | 1500 |
| digits | 2 | 2 | 3 | 3 | 3 | 4 | 4 | 4 | 5 | 5 |

`KVRecallFamily(distance_words=..., num_pairs=...)` overrides the distance and the number of pairs at every level.
The canonical key (which decides the split) is the ordered pairs plus the queried key; filler is not part of it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from evaluation.tasks.base import Example, TaskFamily, stable_hash

NUM_PAIRS = (2, 3, 4, 5, 6, 8, 10, 12, 14, 16)
DISTANCE_WORDS = (10, 25, 50, 100, 200, 350, 500, 750, 1000, 1500)
VALUE_DIGITS = (2, 2, 3, 3, 3, 4, 4, 4, 5, 5)

KEY_CONSONANTS = "bdfghklmnprstvz"
KEY_VOWELS = "aeiou"

FILLER_NOUNS = (
    "river", "garden", "window", "lantern", "meadow", "cloud", "pebble", "forest", "harbor", "candle", "bridge",
    "cottage", "valley", "feather", "teapot", "blanket", "village", "mountain", "basket", "ribbon", "kettle", "road",
)  # fmt: skip
FILLER_ADJECTIVES = (
    "quiet", "golden", "small", "gentle", "warm", "bright", "soft", "distant", "green", "silver", "calm", "narrow",
)  # fmt: skip
FILLER_VERBS = ("waits", "rests", "turns", "drifts", "shines", "hums", "sways", "glows", "stays", "wanders", "sleeps")
FILLER_ADVERBS = ("slowly", "softly", "quietly", "gently", "often", "again", "calmly", "still")
FILLER_PREPOSITIONS = ("near", "under", "beside", "behind", "over", "along", "past")
# Sentence templates by length in words; any remainder of 1..9 words is filled by one sentence of that length.
FILLER_TEMPLATES = {
    1: ("{adv}",),
    2: ("it {verb}",),
    3: ("the {noun} {verb}",),
    4: ("a {noun} {verb} {adv}",),
    5: ("the {adj} {noun} {verb} {adv}",),
    6: ("the {noun} {verb} {prep} the {noun2}",),
    7: (
        "the {adj} {noun} {verb} {prep} the {noun2}",
        "every {noun} near the {noun2} {verb} {adv}",
        "the {noun} {verb} and the {noun2} {verb2}",
    ),
    8: ("the {adj} {noun} {verb} {prep} the {noun2} {adv}",),
    9: ("a {adj} {noun} {verb} {prep} a {adj2} {noun2} {adv}",),
}
# Sentences used while more than 9 words remain (the 1- and 2-word ones only close a paragraph).
FILLER_BODY_LENGTHS = (3, 4, 5, 6, 7, 7, 7, 8, 9)

HEADER = "Remember the value of each key."
_STANDALONE_NUMBER = re.compile(r"(?<![\w-])\d+(?![\w-])")


def filler_text(rng: random.Random, num_words: int) -> str:
    """Exactly `num_words` words of neutral sentences (no digits, no hyphens) drawn from the filler word lists."""
    sentences: list[str] = []
    remaining = num_words
    while remaining > 0:
        length = rng.choice(FILLER_BODY_LENGTHS) if remaining > 9 else remaining
        sentence = rng.choice(FILLER_TEMPLATES[length]).format(
            adj=rng.choice(FILLER_ADJECTIVES),
            adj2=rng.choice(FILLER_ADJECTIVES),
            noun=rng.choice(FILLER_NOUNS),
            noun2=rng.choice(FILLER_NOUNS),
            verb=rng.choice(FILLER_VERBS),
            verb2=rng.choice(FILLER_VERBS),
            adv=rng.choice(FILLER_ADVERBS),
            prep=rng.choice(FILLER_PREPOSITIONS),
        )
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        remaining -= length
    return " ".join(sentences)


def _key(rng: random.Random) -> str:
    def syllable() -> str:
        return rng.choice(KEY_CONSONANTS) + rng.choice(KEY_VOWELS) + rng.choice(KEY_CONSONANTS)

    return f"{syllable()}-{syllable()}"


class KVRecallFamily(TaskFamily):
    """Recall the value of one of several `key: value` pairs after a controlled amount of filler."""

    name = "kv_recall"

    def __init__(self, distance_words: int | None = None, num_pairs: int | None = None) -> None:
        """Optional overrides of the level's distance (in words) and number of pairs."""
        if distance_words is not None and distance_words < 0:
            raise ValueError(f"distance_words must be >= 0, got {distance_words}.")
        if num_pairs is not None and num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}.")
        self.distance_words = distance_words
        self.num_pairs = num_pairs

    def config_fingerprint(self) -> str:
        return f"distance={self.distance_words},pairs={self.num_pairs}"

    def propose(self, rng: random.Random, difficulty: int) -> tuple[str, Callable[[], Example]]:
        """Draw the pairs and the queried key; the filler is only rendered for accepted candidates."""
        i = difficulty - 1
        num_pairs = self.num_pairs if self.num_pairs is not None else NUM_PAIRS[i]
        distance = self.distance_words if self.distance_words is not None else DISTANCE_WORDS[i]
        digits = VALUE_DIGITS[i]
        keys: list[str] = []
        while len(keys) < num_pairs:
            key = _key(rng)
            if key not in keys:
                keys.append(key)
        values: list[str] = []
        while len(values) < num_pairs:
            value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
            if value not in values or num_pairs > 9 * 10 ** (digits - 1):
                values.append(value)
        # Each pair line is two words; the queried pair must leave at most `distance` words of pairs after it.
        query_index = rng.randint(max(0, num_pairs - 1 - distance // 2), num_pairs - 1)
        canonical_key = ";".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) + f"?{keys[query_index]}"

        def render() -> Example:
            filler_rng = random.Random(stable_hash("filler", self.config_fingerprint(), difficulty, canonical_key))
            return self._render(keys, values, query_index, distance, filler_rng, difficulty, canonical_key)

        return canonical_key, render

    def sample(self, rng: random.Random, difficulty: int) -> Example:
        """One prompt: pairs, filler sized so the queried value sits exactly `distance` words before the question."""
        _, render = self.propose(rng, difficulty)
        return render()

    def _render(
        self,
        keys: list[str],
        values: list[str],
        query_index: int,
        distance: int,
        filler_rng: random.Random,
        difficulty: int,
        canonical_key: str,
    ) -> Example:
        num_pairs = len(keys)
        filler_words = distance - 2 * (num_pairs - 1 - query_index)
        query_key, answer = keys[query_index], values[query_index]
        lines = [HEADER]
        value_span = [0, 0]
        offset = len(HEADER) + 1
        for index, (key, value) in enumerate(zip(keys, values, strict=True)):
            line = f"{key}: {value}"
            if index == query_index:
                start = offset + len(key) + 2
                value_span = [start, start + len(value)]
            lines.append(line)
            offset += len(line) + 1
        filler = filler_text(filler_rng, filler_words)
        if filler:
            lines.append(filler)
        lines.append(f"Question: What is the value of {query_key}?")
        prompt = "\n".join(lines) + "\nAnswer:"
        question_start = prompt.index("\nQuestion: ") + 1
        meta = {
            "difficulty": difficulty,
            "pairs": [[key, value] for key, value in zip(keys, values, strict=True)],
            "num_pairs": num_pairs,
            "query_key": query_key,
            "query_index": query_index,
            "distance_words": len(prompt[value_span[1] : question_start].split()),
            "filler_words": filler_words,
            "value_char_span": value_span,
            "question_char_start": question_start,
            "canonical_key": canonical_key,
        }
        return Example(family=self.name, prompt=prompt, target=f" {answer}", answer=answer, meta=meta)

    def extract_answer(self, completion: str) -> str | None:
        """The first standalone integer in `completion` (digits inside a key such as `a-12` do not count)."""
        if not isinstance(completion, str):
            return None
        match = _STANDALONE_NUMBER.search(completion)
        return match.group(0) if match else None
