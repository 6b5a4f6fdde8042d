"""GSM8K-style multi-step arithmetic word problems with worked, line-per-step solutions.

A problem is a short story about one running quantity (money, candies, distance from home, cookies, apples,
books) that a chain of operations changes; the question asks for its final value. The target is the worked
solution, one calculation per line (`Money after the notebooks: 40 - 12 = 28`) and a last line `#### 28` as in
GSM8K. `meta["steps"]` keeps every step structured (`expression`, `result`, `text`) so Phase 3 can turn them into
thoughts.

Difficulty levels (operations per story / largest start or added number / largest factor / operations allowed):

| level | ops | numbers | factors | operations |
|---|---|---|---|---|
| 1 | 1 | 20 | - | add, subtract |
| 2 | 2 | 30 | 5 | + buy/give in groups (`a * b` then add/subtract) |
| 3 | 2 | 50 | 6 | + multiply the running value |
| 4 | 3 | 100 | 8 | + divide into equal shares |
| 5 | 3 | 200 | 10 | same |
| 6 | 4 | 500 | 12 | + percentages (`x * p / 100` then subtract) |
| 7 | 5 | 1000 | 12 | same |
| 8 | 5 | 2000 | 15 | same, more percentages |
| 9 | 6 | 5000 | 20 | same |
| 10 | 7 | 10000 | 25 | same |

Group and percentage operations take two steps, so a level-10 story has 7 to 14 steps. Every intermediate value is
a positive integer no larger than 10 times the level's number range; a running value is multiplied by at most 9.
The canonical key (which decides the split) is the theme, the start value and the operation chain with its
constants; names and items are cosmetic.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from evaluation.tasks.base import Example, TaskFamily

MAX_VALUES = (20, 30, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
MAX_FACTORS = (2, 5, 6, 8, 10, 12, 12, 15, 20, 25)
NUM_OPERATIONS = (1, 2, 2, 3, 3, 4, 5, 5, 6, 7)
# The level from which each operation may appear.
OPERATION_LEVELS = {"add": 1, "sub": 1, "group_add": 2, "group_sub": 2, "mul": 3, "div": 4, "pct_sub": 6}
# Scaling the running value stays "times a one-digit number"; group products use the full factor range.
MAX_MULTIPLIER = 9
PERCENTAGES = (10, 20, 25, 50, 75)
MORE_PERCENTAGES = (5, 15, 30, 40, 60, 80)

NAMES = (
    "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lina", "Sam", "Ivy", "Ben", "Nora", "Eli", "Ruby", "Finn",
    "Maya", "Theo", "Aria", "Jack", "Luz", "Ravi", "Kira", "Owen", "Hana", "Tom", "Ines", "Yuki", "Dara", "Max",
)  # fmt: skip

# Each theme: the start sentence, the question, and per operation a sentence plus one label per step it takes.
# Placeholders: {name} {x} {k} {a} {b} {p} {item}.
THEMES: dict[str, dict[str, Any]] = {
    "shopping": {
        "start": "{name} has ${x}.",
        "question": "How many dollars does {name} have now?",
        "items": ("book", "hat", "lunch box", "kite", "ticket", "puzzle"),
        "add": ("{name} earns ${k} by walking a neighbor's dog.", ("Money after earning",)),
        "sub": ("{name} spends ${k} on a {item}.", ("Money after buying the {item}",)),
        "mul": ("An aunt gives {name} enough to make the money {k} times as much.", ("Money after the gift",)),
        "div": (
            "{name} splits the money equally into {k} envelopes and keeps one envelope.",
            ("Money in one envelope",),
        ),
        "group_add": ("{name} sells {a} old toys for ${b} each.", ("Money from the toys", "Money after selling")),
        "group_sub": (
            "{name} buys {a} notebooks at ${b} each.",
            ("Cost of the notebooks", "Money after the notebooks"),
        ),
        "pct_sub": ("{name} donates {p}% of the money to charity.", ("Donation", "Money after the donation")),
    },
    "sharing": {
        "start": "{name} has {x} candies.",
        "question": "How many candies does {name} have now?",
        "items": ("friend", "cousin", "neighbor", "classmate"),
        "add": ("{name} gets {k} more candies from a {item}.", ("Candies after the gift",)),
        "sub": ("{name} eats {k} candies.", ("Candies after eating",)),
        "mul": ("A grandparent refills the jar so {name} has {k} times as many candies.", ("Candies after refill",)),
        "div": (
            "{name} shares the candies equally among {k} children, {name} included, and keeps one share.",
            ("Candies in one share",),
        ),
        "group_add": ("{name} buys {a} bags with {b} candies in each.", ("Candies in the bags", "Candies now")),
        "group_sub": (
            "{name} gives {b} candies to each of {a} classmates.",
            ("Candies given away", "Candies left"),
        ),
        "pct_sub": ("{name} gives {p}% of the candies to a {item}.", ("Candies given", "Candies left")),
    },
    "travel": {
        "start": "{name} is {x} km from home.",
        "question": "How many km from home is {name} now?",
        "items": ("bike", "scooter", "horse"),
        "add": ("{name} rides the {item} {k} km farther from home.", ("Distance after riding away",)),
        "sub": ("{name} rides the {item} {k} km back toward home.", ("Distance after riding back",)),
        "mul": ("{name} keeps going until the distance from home is {k} times as large.", ("Distance now",)),
        "div": (
            "{name} rides back toward home until the distance is 1/{k} of what it was.",
            ("Distance after riding back",),
        ),
        "group_add": (
            "{name} rides away from home for {a} hours at {b} km per hour.",
            ("Distance ridden", "Distance from home"),
        ),
        "group_sub": (
            "{name} rides toward home for {a} hours at {b} km per hour.",
            ("Distance ridden", "Distance from home"),
        ),
        "pct_sub": (
            "{name} rides toward home and covers {p}% of the distance.",
            ("Distance covered", "Distance from home"),
        ),
    },
    "bakery": {
        "start": "{name}'s bakery has {x} cookies.",
        "question": "How many cookies does the bakery have now?",
        "items": ("oat", "chocolate", "ginger", "lemon"),
        "add": ("The baker bakes {k} more {item} cookies.", ("Cookies after baking",)),
        "sub": ("Customers buy {k} cookies.", ("Cookies after the sale",)),
        "mul": ("For a festival the baker bakes until there are {k} times as many cookies.", ("Cookies now",)),
        "div": (
            "The cookies are split equally among {k} shops, and the bakery keeps one share.",
            ("Cookies in one share",),
        ),
        "group_add": (
            "The baker bakes {a} trays with {b} {item} cookies on each tray.",
            ("Cookies on the trays", "Cookies now"),
        ),
        "group_sub": ("{a} customers each buy {b} cookies.", ("Cookies sold", "Cookies left")),
        "pct_sub": ("{p}% of the cookies are sold in the morning.", ("Cookies sold", "Cookies left")),
    },
    "farm": {
        "start": "{name} picks {x} apples.",
        "question": "How many apples does {name} have now?",
        "items": ("market", "fair", "shop"),
        "add": ("{name} picks {k} more apples.", ("Apples after picking",)),
        "sub": ("{name} sells {k} apples at the {item}.", ("Apples after selling",)),
        "mul": ("A good harvest leaves {name} with {k} times as many apples.", ("Apples after the harvest",)),
        "div": ("{name} packs the apples equally into {k} crates and keeps one crate.", ("Apples in one crate",)),
        "group_add": (
            "{name} picks {a} more baskets with {b} apples in each.",
            ("Apples in the baskets", "Apples now"),
        ),
        "group_sub": ("{name} gives {b} apples to each of {a} neighbors.", ("Apples given away", "Apples left")),
        "pct_sub": ("{name} uses {p}% of the apples to make pies.", ("Apples for pies", "Apples left")),
    },
    "library": {
        "start": "A library shelf that {name} looks after holds {x} books.",
        "question": "How many books are on the shelf now?",
        "items": ("history", "science", "poetry", "travel"),
        "add": ("Readers return {k} {item} books to the shelf.", ("Books after returns",)),
        "sub": ("Readers borrow {k} books from the shelf.", ("Books after borrowing",)),
        "mul": ("{name} restocks the shelf so it holds {k} times as many books.", ("Books after restocking",)),
        "div": (
            "The books are split equally among {k} shelves, and this shelf keeps one share.",
            ("Books on this shelf",),
        ),
        "group_add": (
            "{name} adds {a} boxes with {b} {item} books in each.",
            ("Books in the boxes", "Books now"),
        ),
        "group_sub": ("{a} classes each borrow {b} books.", ("Books borrowed", "Books left")),
        "pct_sub": ("{p}% of the books are sent away for repair.", ("Books sent away", "Books left")),
    },
}


@dataclass(frozen=True)
class _Level:
    max_value: int
    max_factor: int
    num_operations: int
    operations: tuple[str, ...]
    percentages: tuple[int, ...]

    @property
    def cap(self) -> int:
        return 10 * self.max_value


def _level(difficulty: int) -> _Level:
    i = difficulty - 1
    operations = tuple(op for op, level in OPERATION_LEVELS.items() if level <= difficulty)
    percentages = PERCENTAGES + (MORE_PERCENTAGES if difficulty >= 8 else ())
    return _Level(MAX_VALUES[i], MAX_FACTORS[i], NUM_OPERATIONS[i], operations, percentages)


def _step(label: str, left: int, op: str, right: int, result: int) -> dict[str, Any]:
    expression = f"{left} {op} {right}"
    return {"expression": expression, "result": result, "text": f"{label}: {expression} = {result}"}


def _draw_operation(op: str, x: int, rng: random.Random, level: _Level) -> tuple[dict[str, int], int] | None:
    """Constants for one operation on the running value `x` and the new value, or None when infeasible."""
    top = level.max_factor
    if op == "add":
        k = rng.randint(1, level.max_value)
        return ({"k": k}, x + k) if x + k <= level.cap else None
    if op == "sub":
        if x < 2:
            return None
        k = rng.randint(1, min(level.max_value, x - 1))
        return {"k": k}, x - k
    if op == "mul":
        k = rng.randint(2, min(top, MAX_MULTIPLIER))
        return ({"k": k}, x * k) if x * k <= level.cap else None
    if op == "div":
        divisors = [k for k in range(2, top + 1) if x % k == 0]
        if not divisors:
            return None
        k = rng.choice(divisors)
        return {"k": k}, x // k
    if op in ("group_add", "group_sub"):
        a, b = rng.randint(2, top), rng.randint(2, top)
        if op == "group_add":
            return ({"a": a, "b": b}, x + a * b) if x + a * b <= level.cap else None
        return ({"a": a, "b": b}, x - a * b) if a * b < x else None
    if op == "pct_sub":
        feasible = [p for p in level.percentages if (x * p) % 100 == 0 and x * p // 100 < x]
        if not feasible:
            return None
        p = rng.choice(feasible)
        return {"p": p}, x - x * p // 100
    raise ValueError(f"Unknown operation {op!r}")


def _steps_for(op: str, labels: tuple[str, ...], x: int, params: dict[str, int], result: int) -> list[dict[str, Any]]:
    if op == "add":
        return [_step(labels[0], x, "+", params["k"], result)]
    if op == "sub":
        return [_step(labels[0], x, "-", params["k"], result)]
    if op == "mul":
        return [_step(labels[0], x, "*", params["k"], result)]
    if op == "div":
        return [_step(labels[0], x, "/", params["k"], result)]
    if op in ("group_add", "group_sub"):
        group = params["a"] * params["b"]
        sign = "+" if op == "group_add" else "-"
        return [_step(labels[0], params["a"], "*", params["b"], group), _step(labels[1], x, sign, group, result)]
    if op == "pct_sub":
        part = x * params["p"] // 100
        first = {
            "expression": f"{x} * {params['p']} / 100",
            "result": part,
            "text": f"{labels[0]}: {x} * {params['p']} / 100 = {part}",
        }
        return [first, _step(labels[1], x, "-", part, result)]
    raise ValueError(f"Unknown operation {op!r}")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number written by a model (`1,234.0` -> `1234`), or None when it is not one."""
    cleaned = text.strip().rstrip(".").strip().lstrip("$").replace(",", "")
    if not re.fullmatch(r"-?\d+(\.\d+)?", cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


class ArithmeticFamily(TaskFamily):
    """Multi-step arithmetic word problems whose targets are GSM8K-style worked solutions ending in `#### N`."""

    name = "arithmetic"

    def sample(self, rng: random.Random, difficulty: int) -> Example:
        """One story: a theme, a start value and `NUM_OPERATIONS[level]` feasible operations."""
        level = _level(difficulty)
        theme_name = rng.choice(sorted(THEMES))
        theme = THEMES[theme_name]
        person = rng.choice(NAMES)
        item = rng.choice(theme["items"])
        x = rng.randint(2, level.max_value)
        fill = {"name": person, "item": item}
        sentences = [theme["start"].format(x=x, **fill)]
        steps: list[dict[str, Any]] = []
        operations: list[dict[str, Any]] = []
        key_parts = [theme_name, str(x)]
        for _ in range(level.num_operations):
            for _attempt in range(100):
                op = rng.choice(level.operations)
                drawn = _draw_operation(op, x, rng, level)
                if drawn is not None:
                    break
            else:  # no feasible operation found: fall back to an addition, always feasible for small values
                op, drawn = "add", ({"k": 1}, x + 1)
            params, result = drawn
            sentence, labels = theme[op]
            sentences.append(sentence.format(**params, **fill))
            labels = tuple(label.format(**fill) for label in labels)
            steps.extend(_steps_for(op, labels, x, params, result))
            operations.append({"op": op, **params})
            key_parts.append(op + ":" + ",".join(f"{k}={v}" for k, v in sorted(params.items())))
            x = result
        sentences.append(theme["question"].format(**fill))
        answer = str(x)
        prompt = f"Question: {' '.join(sentences)}\nAnswer:"
        target = "\n" + "\n".join(step["text"] for step in steps) + f"\n#### {answer}"
        meta = {
            "difficulty": difficulty,
            "theme": theme_name,
            "name": person,
            "operations": operations,
            "steps": steps,
            "num_steps": len(steps),
            "canonical_key": "|".join(key_parts),
        }
        return Example(family=self.name, prompt=prompt, target=target, answer=answer, meta=meta)

    def extract_answer(self, completion: str) -> str | None:
        """The number on the first `####` line (`#### 12`, `#### 12.`, `#### 1,200`); None when absent or malformed."""
        if not isinstance(completion, str) or "####" not in completion:
            return None
        line = completion.split("####", 1)[1].split("\n", 1)[0]
        return normalize_number(line)
