"""Variable chains: follow `x=y` links through shuffled assignments to a digit, a probe where depth is the bottleneck.

    q=7
    m=k
    k=2
    f=q
    m=          <- the question; the answer is 2

Each character is its own token for a byte-level BPE (the pre-tokenizer splits letters from `=` and newlines), so
the format adds no depth of its own: a direct lookup (`q=` -> `7`) is one induction step (find where `q=` occurred,
copy what followed), and each link needs the result of the lookup before it.

Every example holds `num_chains` chains of single-letter variables, each ending in a different literal digit, with
all assignment lines shuffled together. The queried variable sits `links` assignments above its digit, so answering
takes `lookups = links + 1` successive lookups by content (find the line that defines the variable, read its
right-hand side, repeat), and no written step breaks them up: the answer is the digit alone. A model that only
learned "the answer is one of the digits shown" scores `log(num_chains)` nats on it; one that follows the chain
scores near 0; uniform over ten digits is `log(10)`. Which chain holds the query, the order of the lines and the
letters are all random, so there is no shortcut by position. That makes it a test of serial depth (each lookup is
one attention composition): what a recursion that attends over the context should buy, as extra layers do.

Difficulty level L: `lookups = L` (1..10; level 1 asks for a variable assigned a digit directly, level 2 one link
above it, ...), `num_chains = 2` (so 2 L distinct letters, at most 20 of 26). `VariableChainFamily(num_chains=...)`
overrides the number of chains (`num_chains * L` letters must fit in 26).
The canonical key (which decides the split) is the shuffled lines plus the query: the whole problem.
"""

from __future__ import annotations

import random
import re
import string

from evaluation.tasks.base import Example, TaskFamily

_ANSWER = re.compile(r"-?\d+")


class VariableChainFamily(TaskFamily):
    """Resolve a variable through `difficulty` lookups (`difficulty - 1` links) of shuffled assignments."""

    name = "variable_chain"

    def __init__(self, num_chains: int | None = None) -> None:
        """Optional override of the number of chains (2 by default); the distractor chains end in other digits."""
        if num_chains is not None and not 1 <= num_chains <= 10:
            raise ValueError(f"num_chains must be in [1, 10] (one distinct digit per chain), got {num_chains}.")
        self.num_chains = num_chains

    def config_fingerprint(self) -> str:
        return f"chains={self.num_chains}"

    def sample(self, rng: random.Random, difficulty: int) -> Example:
        """One problem: `num_chains` chains of `difficulty - 1` links each, lines shuffled, the query on one chain."""
        links = difficulty - 1
        chains = self.num_chains if self.num_chains is not None else 2
        letters_needed = chains * (links + 1)
        if letters_needed > len(string.ascii_lowercase):
            raise ValueError(
                f"variable_chain: {chains} chains of {links} links need {letters_needed} distinct letters (26 exist). "
                "Fix: lower the difficulty or num_chains."
            )
        letters = rng.sample(string.ascii_lowercase, letters_needed)
        digits = rng.sample(string.digits, chains)
        lines, queries = [], []
        for index, digit in enumerate(digits):
            names = letters[index * (links + 1) : (index + 1) * (links + 1)]
            lines.append(f"{names[0]}={digit}")
            lines.extend(f"{names[j]}={names[j - 1]}" for j in range(1, links + 1))
            queries.append((names[-1], digit))
        rng.shuffle(lines)
        chain = rng.randrange(chains)
        query, answer = queries[chain]
        prompt = "\n".join([*lines, f"{query}="])
        canonical_key = ";".join(lines) + f"?{query}"
        meta = {
            "difficulty": difficulty,
            "links": links,
            "lookups": links + 1,
            "num_chains": chains,
            "query": query,
            "query_chain": chain,
            "canonical_key": canonical_key,
        }
        return Example(family=self.name, prompt=prompt, target=answer, answer=answer, meta=meta)

    def extract_answer(self, completion: str) -> str | None:
        """The first integer in the completion (the digit the chain resolves to), or None."""
        match = _ANSWER.search(completion)
        return match.group(0) if match else None


def resolve(prompt: str) -> str:
    """The value of the queried variable, by following the assignments (the reference solver for the tests)."""
    lines = prompt.split("\n")
    assignments = dict(line.split("=") for line in lines[:-1])
    value = lines[-1].removesuffix("=")
    while not value.isdigit():
        value = assignments[value]
    return value
