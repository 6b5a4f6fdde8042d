"""Simple Python functions with tests, HumanEval style: the prompt is the start of the code, the model writes the body.

Each example's prompt is a signature plus a docstring (the spec and one worked call); the target is a correct
body; `meta` carries the `tests` (assert snippets), the `entry_point`, the full reference `solution`, the
`template` and its constant `params`, the `test_cases` (call, expected) behind the tests, and `step`, a plain
description of the computation used by `hint`. `answer` holds the reference body too, but a completion is never
compared with it as a string: scoring runs prompt + completion and the tests in the project's sandbox
(`evaluation.sandbox`, imported lazily), never in this process. A completion is cut at HumanEval's stop sequences.

Templates have a level; difficulty `d` draws from the templates of levels `d - 1` and `d` (level 1 alone for
`d = 1`):

| level | what the function does |
|---|---|
| 1 | one arithmetic operation with a constant (add, subtract, multiply, sum of two arguments plus a constant) |
| 2 | two operations or a comparison (linear map, divisibility test, remainder, square plus constant) |
| 3 | conditionals (clamp to a range, piecewise rule, distance to a constant, threshold label) |
| 4 | string operations (wrap, repeat with separator, count two characters, replace a character) |
| 5 | one pass over a list (map, filter a range, count multiples, conditional sum) |
| 6 | loops with accumulators over a range (sums of multiples, stepped sums, iterated updates) |
| 7 | loops over strings (count characters from a set, remove characters, insert a separator every k) |
| 8 | multi-step list algorithms (capped running sums, first index above, second largest, best window) |
| 9 | nested loops and dictionaries (pair counting, FizzBuzz with custom words, letter counts) |
| 10 | stopping rules and number theory (Collatz-like step counts, primes in a residue class, base conversion) |

The canonical key (which decides the split) is the template and its constants; the function name is cosmetic.
Phase 5 helpers: `make_variant(example, seed)` (same template and split, new constants and name) and
`hint(example, result)` (a procedural hint from a failed sandbox run).
"""

from __future__ import annotations

import ast
import json
import random
import re
import string
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from evaluation.tasks.base import Example, TaskFamily, split_for_key, stable_hash

if TYPE_CHECKING:
    from evaluation.sandbox import ExecutionResult

logger = logging.get_logger(__name__)

# Where a completion stops being the function body (HumanEval's stop sequences).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

DOC_WIDTH = 100  # docstring lines are wrapped to this width
WORDS = ("cat", "sun", "tree", "blue", "moon", "river", "code", "apple", "stone", "bird", "lamp", "rain", "gold")
SEPARATORS = ("", " ", "-", "+", "|", ",", ";", "/", ".", ":", "_", "*")
MARKERS = ("<", ">", "[", "]", "(", ")", "**", "__", "--", "##", "~", "!", "?", "@", "=", "%")
LABEL_PAIRS = (("small", "large"), ("low", "high"), ("short", "long"), ("cold", "hot"), ("few", "many"))
FIZZ_WORDS = ("Fizz", "Buzz", "Bang", "Pop", "Zap", "Ding", "Boom", "Tick", "Hop", "Ping")


@dataclass(frozen=True)
class Problem:
    """One instantiated template: its constants, signature, spec, reference body and test inputs."""

    params: dict[str, Any]
    signature: str  # "(x: int) -> int"
    doc: str  # the spec, one or more sentences
    body: str  # the reference body, indented by four spaces, ending with a newline
    step: str  # what the needed computation is, for hints
    inputs: list[tuple[Any, ...]]  # argument tuples, the first one shown in the docstring
    reference: Callable[..., Any]  # trusted Python that computes the expected outputs


@dataclass(frozen=True)
class CodeTemplate:
    """A family of problems that differ only in constants and function name."""

    id: str
    level: int
    names: tuple[str, ...]
    build: Callable[[random.Random], Problem]


def _indent(code: str) -> str:
    return "".join(f"    {line}\n" if line else "\n" for line in code.strip("\n").split("\n"))


def _distinct_ints(rng: random.Random, k: int, lo: int, hi: int) -> list[int]:
    return rng.sample(range(lo, hi + 1), k)


def _int_list(rng: random.Random, lo: int, hi: int, min_len: int = 1, max_len: int = 8) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(min_len, max_len))]


def _letters_text(rng: random.Random, must: str = "", max_len: int = 12) -> str:
    chars = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, max_len))]
    for ch in must:
        chars.insert(rng.randint(0, len(chars)), ch)
    return "".join(chars)


def _signed(value: int) -> str:
    """`x + 3` or `x - 3` instead of `x + -3`."""
    return f"+ {value}" if value >= 0 else f"- {-value}"


# ---------------------------------------------------------------------------------------------------------------
# Level 1: one arithmetic operation with a constant.


def _add_constant(rng: random.Random) -> Problem:
    c = rng.randint(1, 999)
    return Problem(
        {"c": c}, "(x: int) -> int", f"Return x plus {c}.", _indent(f"return x + {c}"), f"Add {c} to x.",
        [(v,) for v in [rng.randint(-50, 200), 0, *_distinct_ints(rng, 2, -100, 500)]], lambda x: x + c,
    )  # fmt: skip


def _subtract_constant(rng: random.Random) -> Problem:
    c = rng.randint(1, 999)
    return Problem(
        {"c": c}, "(x: int) -> int", f"Return x minus {c}.", _indent(f"return x - {c}"), f"Subtract {c} from x.",
        [(v,) for v in [rng.randint(0, 1500), 0, *_distinct_ints(rng, 2, -100, 1500)]], lambda x: x - c,
    )  # fmt: skip


def _multiply_constant(rng: random.Random) -> Problem:
    c = rng.randint(2, 199)
    return Problem(
        {"c": c}, "(x: int) -> int", f"Return x multiplied by {c}.", _indent(f"return x * {c}"),
        f"Multiply x by {c}.", [(v,) for v in [rng.randint(1, 30), 0, *_distinct_ints(rng, 2, -30, 100)]],
        lambda x: x * c,
    )  # fmt: skip


def _sum_plus_constant(rng: random.Random) -> Problem:
    c = rng.randint(0, 999)
    return Problem(
        {"c": c}, "(a: int, b: int) -> int", f"Return the sum of a and b, plus {c}.", _indent(f"return a + b + {c}"),
        f"Add a and b, then add {c}.", [(rng.randint(-20, 100), rng.randint(-20, 100)) for _ in range(4)],
        lambda a, b: a + b + c,
    )  # fmt: skip


# Level 2: two operations or a comparison.


def _linear(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 20), rng.randint(1, 99)
    return Problem(
        {"a": a, "b": b}, "(x: int) -> int", f"Return {a} times x, plus {b}.", _indent(f"return {a} * x + {b}"),
        f"Multiply x by {a}, then add {b}.", [(v,) for v in [rng.randint(1, 20), 0, *_distinct_ints(rng, 2, -30, 50)]],
        lambda x: a * x + b,
    )  # fmt: skip


def _is_multiple(rng: random.Random) -> Problem:
    c = rng.randint(2, 99)
    inputs = [(c * rng.randint(1, 9),), (c * rng.randint(1, 9) + rng.randint(1, c - 1),), (0,), (rng.randint(1, 500),)]
    return Problem(
        {"c": c}, "(x: int) -> bool", f"Return True if x is divisible by {c}, otherwise False.",
        _indent(f"return x % {c} == 0"), f"Check whether the remainder of x divided by {c} is zero.", inputs,
        lambda x: x % c == 0,
    )  # fmt: skip


def _remainder(rng: random.Random) -> Problem:
    c = rng.randint(2, 99)
    return Problem(
        {"c": c}, "(x: int) -> int", f"Return the remainder of x divided by {c}. x is never negative.",
        _indent(f"return x % {c}"), f"Use the modulo operator: x % {c}.",
        [(v,) for v in [rng.randint(c, 500), 0, *_distinct_ints(rng, 2, 1, 1000)]], lambda x: x % c,
    )  # fmt: skip


def _square_plus(rng: random.Random) -> Problem:
    c = rng.randint(1, 999)
    return Problem(
        {"c": c}, "(x: int) -> int", f"Return x squared, plus {c}.", _indent(f"return x * x + {c}"),
        f"Multiply x by itself, then add {c}.",
        [(v,) for v in [rng.randint(2, 12), 0, *_distinct_ints(rng, 2, -20, 40)]], lambda x: x * x + c,
    )  # fmt: skip


# Level 3: conditionals.


def _clamp(rng: random.Random) -> Problem:
    lo = rng.randint(-50, 50)
    hi = lo + rng.randint(1, 100)
    body = f"if x < {lo}:\n    return {lo}\nif x > {hi}:\n    return {hi}\nreturn x"
    inputs = [(rng.randint(lo, hi),), (lo - rng.randint(1, 50),), (hi + rng.randint(1, 50),), (lo,), (hi,)]
    return Problem(
        {"lo": lo, "hi": hi}, "(x: int) -> int",
        f"Return x limited to the range from {lo} to {hi}: {lo} if x is smaller, {hi} if x is larger, else x.",
        _indent(body), f"Compare x with {lo} and with {hi} and return the bound that x crosses, else x.", inputs,
        lambda x: min(max(x, lo), hi),
    )  # fmt: skip


def _piecewise(rng: random.Random) -> Problem:
    t, a, b = rng.randint(-20, 50), rng.randint(1, 20), rng.randint(1, 20)
    body = f"if x > {t}:\n    return x - {a}\nreturn x + {b}"
    inputs = [(t + rng.randint(1, 30),), (t - rng.randint(0, 30),), (t,), (t + 1,)]
    return Problem(
        {"t": t, "a": a, "b": b}, "(x: int) -> int",
        f"If x is greater than {t}, return x minus {a}; otherwise return x plus {b}.", _indent(body),
        f"Test x > {t}: subtract {a} when it holds, add {b} when it does not.", inputs,
        lambda x: x - a if x > t else x + b,
    )  # fmt: skip


def _distance_to_constant(rng: random.Random) -> Problem:
    c = rng.randint(-100, 100)
    return Problem(
        {"c": c}, "(x: int) -> int", f"Return the distance between x and {c}, which is never negative.",
        _indent(f"return abs(x {_signed(-c)})"), f"Compute x {_signed(-c)} and take its absolute value.",
        [(v,) for v in [c + rng.randint(1, 40), c - rng.randint(1, 40), c, rng.randint(-150, 150)]],
        lambda x: abs(x - c),
    )  # fmt: skip


def _threshold_label(rng: random.Random) -> Problem:
    t = rng.randint(1, 100)
    low, high = rng.choice(LABEL_PAIRS)
    return Problem(
        {"t": t, "low": low, "high": high}, "(x: int) -> str",
        f"Return {high!r} if x is at least {t}, otherwise {low!r}.",
        _indent(f"if x >= {t}:\n    return {high!r}\nreturn {low!r}"),
        f"Compare x with {t}: {high!r} when x >= {t}, else {low!r}.",
        [(t + rng.randint(1, 50),), (t - rng.randint(1, 50),), (t,), (t - 1,)],
        lambda x: high if x >= t else low,
    )  # fmt: skip


# Level 4: strings.


def _wrap_string(rng: random.Random) -> Problem:
    left, right = rng.choice(MARKERS), rng.choice(MARKERS)
    return Problem(
        {"left": left, "right": right}, "(s: str) -> str",
        f"Return s with {left!r} in front and {right!r} at the end.",
        _indent(f"return {left!r} + s + {right!r}"), f"Concatenate {left!r}, s and {right!r}.",
        [(rng.choice(WORDS),), ("",), (_letters_text(rng),)], lambda s: left + s + right,
    )  # fmt: skip


def _repeat_with_separator(rng: random.Random) -> Problem:
    c, sep = rng.randint(2, 9), rng.choice(SEPARATORS)
    return Problem(
        {"c": c, "sep": sep}, "(s: str) -> str", f"Return {c} copies of s joined by {sep!r}.",
        _indent(f"return {sep!r}.join([s] * {c})"), f"Make a list of {c} copies of s and join it with {sep!r}.",
        [(rng.choice(WORDS),), (_letters_text(rng, max_len=4),), ("",)], lambda s: sep.join([s] * c),
    )  # fmt: skip


def _count_two_chars(rng: random.Random) -> Problem:
    a, b = rng.sample(string.ascii_lowercase, 2)
    return Problem(
        {"a": a, "b": b}, "(s: str) -> int", f"Return how many characters of s are {a!r} or {b!r}.",
        _indent(f"return s.count({a!r}) + s.count({b!r})"), f"Count the {a!r} characters and the {b!r} characters.",
        [(_letters_text(rng, a + b + a),), (_letters_text(rng, b),), ("",), (_letters_text(rng),)],
        lambda s: s.count(a) + s.count(b),
    )  # fmt: skip


def _replace_char(rng: random.Random) -> Problem:
    a, b = rng.sample(string.ascii_lowercase, 2)
    return Problem(
        {"a": a, "b": b}, "(s: str) -> str", f"Return s with every {a!r} replaced by {b!r}.",
        _indent(f"return s.replace({a!r}, {b!r})"), f"Replace each {a!r} in s with {b!r}.",
        [(_letters_text(rng, a + a),), (_letters_text(rng),), ("",)], lambda s: s.replace(a, b),
    )  # fmt: skip


# Level 5: one pass over a list.


def _scale_and_shift_list(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 10), rng.choice([v for v in range(-20, 21) if v])
    return Problem(
        {"a": a, "b": b}, "(xs: list[int]) -> list[int]",
        f"Return a new list with every element of xs multiplied by {a} and then increased by {b}.",
        _indent(f"return [v * {a} {_signed(b)} for v in xs]"), f"Map each element v to v * {a} + ({b}).",
        [(_int_list(rng, -20, 50),), ([],), (_int_list(rng, 0, 9),)], lambda xs: [v * a + b for v in xs],
    )  # fmt: skip


def _filter_range(rng: random.Random) -> Problem:
    lo = rng.randint(-50, 50)
    hi = lo + rng.randint(0, 60)
    return Problem(
        {"lo": lo, "hi": hi}, "(xs: list[int]) -> list[int]",
        f"Return the elements of xs that are between {lo} and {hi} (inclusive), in their original order.",
        _indent(f"return [v for v in xs if {lo} <= v <= {hi}]"), f"Keep each v with {lo} <= v <= {hi}.",
        [(_int_list(rng, lo - 20, hi + 20, 3, 10),), ([],), (_int_list(rng, lo, hi),), ([lo, hi, lo - 1, hi + 1],)],
        lambda xs: [v for v in xs if lo <= v <= hi],
    )  # fmt: skip


def _count_multiples_above(rng: random.Random) -> Problem:
    c, t = rng.randint(2, 12), rng.randint(-10, 30)
    return Problem(
        {"c": c, "t": t}, "(xs: list[int]) -> int",
        f"Return how many elements of xs are divisible by {c} and greater than {t}.",
        _indent(f"return sum(1 for v in xs if v % {c} == 0 and v > {t})"),
        f"Count the elements v with v % {c} == 0 and v > {t}.",
        [(_int_list(rng, -20, 80, 3, 10),), ([],), ([c * k for k in range(-2, 6)],)],
        lambda xs: sum(1 for v in xs if v % c == 0 and v > t),
    )  # fmt: skip


def _sum_below(rng: random.Random) -> Problem:
    t = rng.randint(-50, 100)
    return Problem(
        {"t": t}, "(xs: list[int]) -> int", f"Return the sum of the elements of xs that are smaller than {t}.",
        _indent(f"return sum(v for v in xs if v < {t})"), f"Add up only the elements v with v < {t}.",
        [(_int_list(rng, t - 30, t + 30, 3, 10),), ([],), ([t, t - 1, t + 1],)],
        lambda xs: sum(v for v in xs if v < t),
    )  # fmt: skip


# Level 6: loops with accumulators.


def _sum_of_multiples(rng: random.Random) -> Problem:
    a, b = sorted(rng.sample(range(2, 31), 2))
    body = (
        f"total = 0\nfor i in range(1, n + 1):\n    if i % {a} == 0 or i % {b} == 0:\n        total += i\nreturn total"
    )
    return Problem(
        {"a": a, "b": b}, "(n: int) -> int",
        f"Return the sum of all integers from 1 to n (inclusive) that are divisible by {a} or by {b}.",
        _indent(body), f"Loop i from 1 to n and add i when i % {a} == 0 or i % {b} == 0.",
        [(rng.randint(b, 80),), (0,), (rng.randint(1, b),), (rng.randint(50, 200),)],
        lambda n: sum(i for i in range(1, n + 1) if i % a == 0 or i % b == 0),
    )  # fmt: skip


def _stepped_sum(rng: random.Random) -> Problem:
    start, step = rng.randint(0, 30), rng.randint(2, 9)
    body = f"total = 0\ni = {start}\nwhile i < n:\n    total += i\n    i += {step}\nreturn total"
    return Problem(
        {"start": start, "step": step}, "(n: int) -> int",
        f"Return the sum of the numbers {start}, {start + step}, {start + 2 * step}, ... (adding {step} each time) "
        "that are smaller than n.",
        _indent(body), f"Start at {start}, add the current number to a total and step by {step} while it is below n.",
        [(rng.randint(start + 1, start + 60),), (start,), (rng.randint(start + 60, start + 200),)],
        lambda n: sum(range(start, n, step)) if n > start else 0,
    )  # fmt: skip


def _iterate_affine(rng: random.Random) -> Problem:
    a, b, k = rng.randint(1, 4), rng.choice([v for v in range(-10, 11) if v]), rng.randint(2, 8)

    def reference(x: int) -> int:
        for _ in range(k):
            x = x * a + b
        return x

    body = f"for _ in range({k}):\n    x = x * {a} {_signed(b)}\nreturn x"
    return Problem(
        {"a": a, "b": b, "k": k}, "(x: int) -> int",
        f"Apply the update x = x * {a} + ({b}) to x {k} times and return the result.", _indent(body),
        f"Loop {k} times; in each pass replace x by x * {a} + ({b}).",
        [(v,) for v in [rng.randint(1, 9), 0, rng.randint(-9, -1)]], reference,
    )  # fmt: skip


# Level 7: loops over strings.


def _count_from_set(rng: random.Random) -> Problem:
    chars = "".join(sorted(rng.sample(string.ascii_lowercase, 3)))
    body = f"count = 0\nfor ch in s:\n    if ch in {chars!r}:\n        count += 1\nreturn count"
    return Problem(
        {"chars": chars}, "(s: str) -> int", f"Return how many characters of s are one of the letters in {chars!r}.",
        _indent(body), f"Loop over s and count the characters that appear in {chars!r}.",
        [(_letters_text(rng, chars),), ("",), (_letters_text(rng, chars[0] * 2),), (_letters_text(rng),)],
        lambda s: sum(1 for ch in s if ch in chars),
    )  # fmt: skip


def _remove_chars(rng: random.Random) -> Problem:
    a, b = sorted(rng.sample(string.ascii_lowercase, 2))
    body = f"result = ''\nfor ch in s:\n    if ch != {a!r} and ch != {b!r}:\n        result += ch\nreturn result"
    return Problem(
        {"a": a, "b": b}, "(s: str) -> str", f"Return s without any {a!r} or {b!r} characters.", _indent(body),
        f"Build a new string from the characters of s that are neither {a!r} nor {b!r}.",
        [(_letters_text(rng, a + b + a),), ("",), (a + b,), (_letters_text(rng),)],
        lambda s: "".join(ch for ch in s if ch not in (a, b)),
    )  # fmt: skip


def _insert_every(rng: random.Random) -> Problem:
    k, sep = rng.randint(1, 9), rng.choice([s for s in SEPARATORS if s])

    def reference(s: str) -> str:
        return sep.join(s[i : i + k] for i in range(0, len(s), k))

    body = f"parts = []\nfor i in range(0, len(s), {k}):\n    parts.append(s[i:i + {k}])\nreturn {sep!r}.join(parts)"
    return Problem(
        {"k": k, "sep": sep}, "(s: str) -> str",
        f"Split s into consecutive chunks of {k} characters (the last chunk may be shorter) and join them "
        f"with {sep!r}.",
        _indent(body), f"Take s[i:i + {k}] for i = 0, {k}, {2 * k}, ... and join the chunks with {sep!r}.",
        [(_letters_text(rng, max_len=20),), ("",), ("a" * k,), (_letters_text(rng, max_len=3 * k + 2),)], reference,
    )  # fmt: skip


# Level 8: multi-step list algorithms.


def _capped_running_sum(rng: random.Random) -> Problem:
    c = rng.randint(5, 200)

    def reference(xs: list[int]) -> list[int]:
        out, total = [], 0
        for v in xs:
            total = min(total + v, c)
            out.append(total)
        return out

    body = (
        f"result = []\ntotal = 0\nfor v in xs:\n    total = min(total + v, {c})\n"
        "    result.append(total)\nreturn result"
    )
    return Problem(
        {"c": c}, "(xs: list[int]) -> list[int]",
        f"Keep a running total that starts at 0: for each element add it, and if the total is now above {c} set it "
        f"to {c}. Return the list of totals after each element.",
        _indent(body), f"After adding each element, cap the total with min(total, {c}) and record it.",
        [(_int_list(rng, -10, c // 2 + 5, 3, 10),), ([],), ([c, 1, -5],)], reference,
    )  # fmt: skip


def _first_index_above(rng: random.Random) -> Problem:
    t, default = rng.randint(-20, 100), rng.randint(-5, -1)
    body = f"for i, v in enumerate(xs):\n    if v > {t}:\n        return i\nreturn {default}"
    return Problem(
        {"t": t, "default": default}, "(xs: list[int]) -> int",
        f"Return the index of the first element of xs that is greater than {t}, or {default} if there is none.",
        _indent(body), f"Scan xs with its indices and return the first index whose value is > {t}; else {default}.",
        [(_int_list(rng, t - 20, t + 20, 3, 10),), ([],), ([t, t - 1],), ([t - 5, t + 1, t + 9],)],
        lambda xs: next((i for i, v in enumerate(xs) if v > t), default),
    )  # fmt: skip


def _second_largest(rng: random.Random) -> Problem:
    default = rng.randint(-100, -1)
    body = f"values = sorted(set(xs))\nif len(values) < 2:\n    return {default}\nreturn values[-2]"
    return Problem(
        {"default": default}, "(xs: list[int]) -> int",
        f"Return the second largest distinct value in xs, or {default} if xs has fewer than two distinct values.",
        _indent(body), f"Remove duplicates, sort, and take the next-to-last value; {default} if there is none.",
        [(_int_list(rng, 0, 50, 3, 9),), ([],), ([7, 7, 7],), ([3, 9, 9, 1],)],
        lambda xs: sorted(set(xs))[-2] if len(set(xs)) >= 2 else default,
    )  # fmt: skip


def _best_window(rng: random.Random) -> Problem:
    k, default = rng.randint(2, 5), rng.randint(-50, 0)
    body = (
        f"if len(xs) < {k}:\n    return {default}\nbest = sum(xs[:{k}])\n"
        f"for i in range(1, len(xs) - {k} + 1):\n    best = max(best, sum(xs[i:i + {k}]))\nreturn best"
    )
    return Problem(
        {"k": k, "default": default}, "(xs: list[int]) -> int",
        f"Return the largest sum of {k} consecutive elements of xs, or {default} if xs has fewer than {k} elements.",
        _indent(body), f"Slide a window of {k} elements over xs and keep the largest window sum.",
        [(_int_list(rng, -20, 30, k, 10),), (list(range(k - 1)),), (_int_list(rng, -9, 9, k + 2, 8),)],
        lambda xs: max(sum(xs[i : i + k]) for i in range(len(xs) - k + 1)) if len(xs) >= k else default,
    )  # fmt: skip


# Level 9: nested loops and dictionaries.


def _count_pairs(rng: random.Random) -> Problem:
    op, t = rng.choice(["+", "*", "-"]), rng.randint(-10, 60)
    relation = {"+": "xs[i] + xs[j]", "*": "xs[i] * xs[j]", "-": "abs(xs[i] - xs[j])"}[op]
    if op == "-":
        t = abs(t)
    body = (
        f"count = 0\nfor i in range(len(xs)):\n    for j in range(i + 1, len(xs)):\n"
        f"        if {relation} == {t}:\n            count += 1\nreturn count"
    )

    def reference(xs: list[int]) -> int:
        def rel(u: int, v: int) -> int:
            return u + v if op == "+" else u * v if op == "*" else abs(u - v)

        return sum(1 for i in range(len(xs)) for j in range(i + 1, len(xs)) if rel(xs[i], xs[j]) == t)

    return Problem(
        {"op": op, "t": t}, "(xs: list[int]) -> int",
        f"Return the number of index pairs i < j such that {relation} == {t}.", _indent(body),
        f"Use two nested loops over i < j and count the pairs where {relation} == {t}.",
        [(_int_list(rng, -5, 15, 4, 10),), ([],), ([t, 0, t, 1],), (_int_list(rng, 0, 8, 5, 9),)], reference,
    )  # fmt: skip


def _custom_fizzbuzz(rng: random.Random) -> Problem:
    a, b = sorted(rng.sample(range(2, 10), 2))
    word_a, word_b = rng.sample(FIZZ_WORDS, 2)

    def reference(n: int) -> list[str]:
        out = []
        for i in range(1, n + 1):
            word = (word_a if i % a == 0 else "") + (word_b if i % b == 0 else "")
            out.append(word or str(i))
        return out

    body = (
        f"result = []\nfor i in range(1, n + 1):\n    word = ''\n    if i % {a} == 0:\n        word += {word_a!r}\n"
        f"    if i % {b} == 0:\n        word += {word_b!r}\n    result.append(word if word else str(i))\nreturn result"
    )
    return Problem(
        {"a": a, "b": b, "word_a": word_a, "word_b": word_b}, "(n: int) -> list[str]",
        f"Return a list of strings for the numbers 1 to n: {word_a!r} for multiples of {a}, {word_b!r} for multiples "
        f"of {b}, {word_a + word_b!r} for multiples of both, and the number itself otherwise.",
        _indent(body), f"For each i build the word from the {a} and {b} divisibility tests; fall back to str(i).",
        [(rng.randint(a * b, a * b + 5),), (0,), (rng.randint(1, 6),)], reference,
    )  # fmt: skip


def _letter_counts(rng: random.Random) -> Problem:
    letters = "".join(sorted(rng.sample(string.ascii_lowercase, 3)))
    body = (
        f"counts = {{}}\nfor ch in s:\n    if ch in {letters!r}:\n"
        "        counts[ch] = counts.get(ch, 0) + 1\nreturn counts"
    )
    return Problem(
        {"letters": letters}, "(s: str) -> dict[str, int]",
        f"Return a dict that maps each of the letters in {letters!r} that occurs in s to the number of times it "
        "occurs. Letters that do not occur are left out.",
        _indent(body), f"Loop over s and increase counts[ch] for every ch in {letters!r}.",
        [(_letters_text(rng, letters + letters[0]),), ("",), (_letters_text(rng),)],
        lambda s: {ch: s.count(ch) for ch in letters if ch in s},
    )  # fmt: skip


# Level 10: loops with a stopping rule, number theory.


def _collatz_steps(rng: random.Random) -> Problem:
    a, b, limit = rng.choice([3, 5, 7]), rng.choice([1, 3, 5, 7, 9]), rng.randint(10, 100)

    def reference(n: int) -> int:
        steps = 0
        while n != 1 and steps < limit:
            n = n // 2 if n % 2 == 0 else a * n + b
            steps += 1
        return steps

    body = (
        f"steps = 0\nwhile n != 1 and steps < {limit}:\n    if n % 2 == 0:\n        n = n // 2\n    else:\n"
        f"        n = {a} * n + {b}\n    steps += 1\nreturn steps"
    )
    return Problem(
        {"a": a, "b": b, "limit": limit}, "(n: int) -> int",
        f"Starting from n (at least 1), repeat: if n is even, halve it; otherwise set n to {a} * n + {b}. Return the "
        f"number of steps until n equals 1, or {limit} if n has not reached 1 after {limit} steps.",
        _indent(body), f"Loop while n != 1 and fewer than {limit} steps were taken, applying the rule and counting.",
        [(rng.randint(2, 40),), (1,), (rng.randint(40, 300),)], reference,
    )  # fmt: skip


def _primes_in_class(rng: random.Random) -> Problem:
    m = rng.randint(2, 15)
    r = rng.randint(0, m - 1)

    def reference(n: int) -> int:
        return sum(1 for p in range(2, n + 1) if all(p % d for d in range(2, int(p**0.5) + 1)) and p % m == r)

    body = (
        f"count = 0\nfor p in range(2, n + 1):\n    is_prime = True\n    for d in range(2, int(p ** 0.5) + 1):\n"
        f"        if p % d == 0:\n            is_prime = False\n            break\n"
        f"    if is_prime and p % {m} == {r}:\n        count += 1\nreturn count"
    )
    return Problem(
        {"m": m, "r": r}, "(n: int) -> int",
        f"Return how many prime numbers p with p <= n leave remainder {r} when divided by {m}.", _indent(body),
        f"Test each p from 2 to n for primality by trial division, and count it when p % {m} == {r}.",
        [(rng.randint(20, 100),), (1,), (rng.randint(2, 20),)], reference,
    )  # fmt: skip


def _to_base(rng: random.Random) -> Problem:
    base, width = rng.randint(2, 9), rng.randint(1, 16)

    def reference(n: int) -> str:
        digits = ""
        while n > 0:
            digits = str(n % base) + digits
            n //= base
        return digits.rjust(width, "0")

    body = (
        f"digits = ''\nwhile n > 0:\n    digits = str(n % {base}) + digits\n    n //= {base}\n"
        f"return digits.rjust({width}, '0')"
    )
    return Problem(
        {"base": base, "width": width}, "(n: int) -> str",
        f"Return the non-negative integer n written in base {base}, padded on the left with zeros to at least "
        f"{width} digits.",
        _indent(body), f"Repeatedly take n % {base} as the next digit (right to left), divide n by {base}, then pad.",
        [(rng.randint(base, 500),), (0,), (rng.randint(1000, 5000),)], reference,
    )  # fmt: skip


TEMPLATES: dict[str, CodeTemplate] = {
    template.id: template
    for template in (
        CodeTemplate("add_constant", 1, ("add_constant", "increase_by", "shift_up"), _add_constant),
        CodeTemplate("subtract_constant", 1, ("subtract_constant", "decrease_by", "shift_down"), _subtract_constant),
        CodeTemplate("multiply_constant", 1, ("multiply_by", "scale", "times_constant"), _multiply_constant),
        CodeTemplate("sum_plus_constant", 1, ("sum_plus", "add_both_plus", "total_plus"), _sum_plus_constant),
        CodeTemplate("linear", 2, ("linear", "affine", "scale_and_shift"), _linear),
        CodeTemplate("is_multiple", 2, ("is_multiple", "divisible", "is_divisible"), _is_multiple),
        CodeTemplate("remainder", 2, ("remainder", "mod_constant", "leftover"), _remainder),
        CodeTemplate("square_plus", 2, ("square_plus", "squared_offset", "square_and_add"), _square_plus),
        CodeTemplate("clamp", 3, ("clamp", "limit", "bound"), _clamp),
        CodeTemplate("piecewise", 3, ("piecewise", "adjust", "step_rule"), _piecewise),
        CodeTemplate("distance_to_constant", 3, ("distance_to", "gap", "how_far"), _distance_to_constant),
        CodeTemplate("threshold_label", 3, ("label", "classify", "describe"), _threshold_label),
        CodeTemplate("wrap_string", 4, ("wrap", "decorate", "surround"), _wrap_string),
        CodeTemplate("repeat_with_separator", 4, ("repeat_join", "echo", "repeat_text"), _repeat_with_separator),
        CodeTemplate("count_two_chars", 4, ("count_chars", "count_letters", "tally"), _count_two_chars),
        CodeTemplate("replace_char", 4, ("replace_char", "swap_letter", "substitute"), _replace_char),
        CodeTemplate("scale_and_shift_list", 5, ("transform", "map_values", "scale_list"), _scale_and_shift_list),
        CodeTemplate("filter_range", 5, ("filter_range", "keep_between", "select_range"), _filter_range),
        CodeTemplate("count_multiples_above", 5, ("count_multiples", "count_matching", "tally_multiples"),
                     _count_multiples_above),
        CodeTemplate("sum_below", 5, ("sum_below", "sum_small", "total_under"), _sum_below),
        CodeTemplate("sum_of_multiples", 6, ("sum_of_multiples", "multiples_total", "sum_divisible"),
                     _sum_of_multiples),
        CodeTemplate("stepped_sum", 6, ("stepped_sum", "sum_steps", "arithmetic_total"), _stepped_sum),
        CodeTemplate("iterate_affine", 6, ("iterate", "repeat_update", "apply_times"), _iterate_affine),
        CodeTemplate("count_from_set", 7, ("count_from_set", "count_special", "letter_hits"), _count_from_set),
        CodeTemplate("remove_chars", 7, ("remove_chars", "strip_letters", "drop_chars"), _remove_chars),
        CodeTemplate("insert_every", 7, ("chunk_join", "group_chars", "insert_every"), _insert_every),
        CodeTemplate("capped_running_sum", 8, ("capped_totals", "running_cap", "bounded_sums"), _capped_running_sum),
        CodeTemplate("first_index_above", 8, ("first_above", "find_first", "index_above"), _first_index_above),
        CodeTemplate("second_largest", 8, ("second_largest", "runner_up", "next_biggest"), _second_largest),
        CodeTemplate("best_window", 8, ("best_window", "max_window_sum", "best_run"), _best_window),
        CodeTemplate("count_pairs", 9, ("count_pairs", "pair_count", "matching_pairs"), _count_pairs),
        CodeTemplate("custom_fizzbuzz", 9, ("fizzbuzz", "word_game", "say_numbers"), _custom_fizzbuzz),
        CodeTemplate("letter_counts", 9, ("letter_counts", "count_each", "histogram"), _letter_counts),
        CodeTemplate("collatz_steps", 10, ("collatz_steps", "count_steps", "steps_to_one"), _collatz_steps),
        CodeTemplate("primes_in_class", 10, ("count_primes", "primes_with_remainder", "prime_tally"),
                     _primes_in_class),
        CodeTemplate("to_base", 10, ("to_base", "convert_base", "in_base"), _to_base),
    )
}  # fmt: skip


def _call(entry_point: str, args: tuple[Any, ...]) -> str:
    return f"{entry_point}({', '.join(repr(arg) for arg in args)})"


def truncate_completion(completion: str) -> str:
    """The function body part of a completion: everything before the first HumanEval stop sequence."""
    end = len(completion)
    for stop in STOP_SEQUENCES:
        index = completion.find(stop)
        if index != -1:
            end = min(end, index)
    return completion[:end]


class SandboxFailedError(RuntimeError):
    """The sandbox failed as a whole (not one program): e.g. bubblewrap missing where isolation is required."""


class CodeFamily(TaskFamily):
    """HumanEval-style function completion, scored by running the tests in the sandbox."""

    name = "code"

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 256,
        max_workers: int | None = None,
        isolation: str = "auto",
        require_isolation: bool = False,
    ) -> None:
        """Sandbox limits used when scoring (per program), the parallelism of `score_batch`, and the isolation
        `evaluation.sandbox.run_code` must use (`require_isolation=True` refuses the rlimits fallback)."""
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_workers = max_workers
        self.isolation = isolation
        self.require_isolation = require_isolation

    # -- generation ------------------------------------------------------------------------------------------------

    def templates_for(self, difficulty: int) -> list[CodeTemplate]:
        """The templates difficulty `difficulty` draws from: levels `difficulty - 1` and `difficulty`."""
        levels = {difficulty, max(1, difficulty - 1)}
        return [template for template in TEMPLATES.values() if template.level in levels]

    def build(self, template: CodeTemplate, rng: random.Random, difficulty: int) -> Example:
        """Instantiate `template` with fresh constants, inputs and function name."""
        problem = template.build(rng)
        entry_point = rng.choice(template.names)
        expected = [problem.reference(*args) for args in problem.inputs]
        example_call = _call(entry_point, problem.inputs[0])
        doc = textwrap.fill(problem.doc, width=DOC_WIDTH, subsequent_indent="    ", break_long_words=False)
        prompt = (
            f"def {entry_point}{problem.signature}:\n"
            f'    """{doc}\n\n    >>> {example_call}\n    {expected[0]!r}\n    """\n'
        )
        test_cases = [
            {"call": _call(entry_point, args), "expected": repr(value)}
            for args, value in zip(problem.inputs, expected, strict=True)
        ]
        tests = [f"assert {case['call']} == {case['expected']}" for case in test_cases]
        meta = {
            "difficulty": difficulty,
            "template": template.id,
            "level": template.level,
            "params": problem.params,
            "entry_point": entry_point,
            "tests": tests,
            "test_cases": test_cases,
            "solution": prompt + problem.body,
            "step": problem.step,
            "canonical_key": f"{template.id}|{json.dumps(problem.params, sort_keys=True)}",
        }
        return Example(family=self.name, prompt=prompt, target=problem.body, answer=problem.body, meta=meta)

    def sample(self, rng: random.Random, difficulty: int) -> Example:
        """A problem from a template of level `difficulty - 1` or `difficulty`."""
        return self.build(rng.choice(self.templates_for(difficulty)), rng, difficulty)

    def make_variant(self, example: Example, seed: int = 0) -> Example:
        """The same template in the same split with different constants (and, where possible, a different name)."""
        template = TEMPLATES[example.meta["template"]]
        split = example.meta.get("split") or split_for_key(self.name, example.key)
        rng = random.Random(stable_hash("variant", self.name, example.key, seed))
        fallback = None
        for _ in range(2000):
            candidate = self.build(template, rng, example.meta["difficulty"])
            if candidate.key == example.key or split_for_key(self.name, candidate.key) != split:
                continue
            candidate.meta["split"] = split
            candidate.meta["variant_of"] = example.key
            if candidate.meta["entry_point"] != example.meta["entry_point"] or len(template.names) == 1:
                return candidate
            fallback = fallback or candidate
        if fallback is not None:
            return fallback
        raise ValueError(f"No variant of template {template.id!r} in split {split!r} differs from {example.key!r}.")

    # -- scoring ---------------------------------------------------------------------------------------------------

    def extract_answer(self, completion: str) -> str | None:
        """The body part of `completion` (cut at the first stop sequence); None when it is empty or not text."""
        if not isinstance(completion, str):
            return None
        body = truncate_completion(completion)
        return body if body.strip() else None

    def program(self, example: Example, completion: str) -> str | None:
        """The code to run for a completion: prompt + body, or None when the completion has no body."""
        body = self.extract_answer(completion)
        return None if body is None else example.prompt + body

    def _limits(self) -> dict[str, Any]:
        return {
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "isolation": self.isolation,
            "require_isolation": self.require_isolation,
        }

    def run(self, examples: Sequence[Example], completions: Sequence[str]) -> list[ExecutionResult | None]:
        """Sandbox results for aligned examples and completions (None where a completion has no body); raises
        `SandboxFailedError` when the sandbox cannot run the batch at all (never a silent zero score)."""
        from evaluation.sandbox import run_many

        if len(examples) != len(completions):
            raise ValueError(f"Got {len(examples)} examples but {len(completions)} completions.")
        pairs = zip(examples, completions, strict=True)
        programs = [self.program(example, completion) for example, completion in pairs]
        todo = [i for i, program in enumerate(programs) if program is not None]
        results: list[ExecutionResult | None] = [None] * len(programs)
        if todo:
            jobs = [(programs[i], examples[i].meta["tests"]) for i in todo]
            try:
                ran = run_many(jobs, max_workers=self.max_workers, **self._limits())
            except Exception as error:  # the sandbox failing as a whole: zeros would hide it and train on noise
                raise SandboxFailedError(
                    f"code: the sandbox could not run the batch ({type(error).__name__}: {error}); no program was "
                    "scored. Fix: install bubblewrap (`apt-get install bubblewrap`, or `make system-deps`) and check "
                    "that user namespaces are allowed, or pass require_isolation=False to accept the weaker rlimits "
                    "fallback."
                ) from error
            for i, result in zip(todo, ran, strict=True):
                results[i] = result
        return results

    def score(self, example: Example, completion: str) -> float:
        """1.0 when prompt + completion passes every test in the sandbox, else 0.0 (`SandboxFailedError` when the
        sandbox cannot run at all)."""
        return self.score_batch([example], [completion])[0]

    def score_batch(self, examples: Sequence[Example], completions: Sequence[str]) -> list[float]:
        """Scores of many completions, run in parallel in the sandbox."""
        results = self.run(examples, completions)  # raises SandboxFailedError when the sandbox fails as a whole
        return [1.0 if result is not None and result.passed else 0.0 for result in results]

    # -- hints -----------------------------------------------------------------------------------------------------

    def _failed_case(self, example: Example, result: ExecutionResult) -> dict[str, Any] | None:
        """The first failing test case as `{"call", "expected", "index"}` (index None when unknown), or None."""
        cases = example.meta.get("test_cases", [])
        failed = list(getattr(result, "tests_failed", None) or [])
        if failed and 0 <= failed[0] < len(cases):
            return {**cases[failed[0]], "index": failed[0]}
        failed_test = getattr(result, "failed_test", None)
        if failed_test:
            for index, case in enumerate(cases):
                if case["call"] in failed_test:
                    return {**case, "index": index}
            parsed = _parse_assert(failed_test)
            return {**parsed, "index": None} if parsed else None
        return None

    def hint(self, example: Example, result: ExecutionResult, completion: str | None = None) -> str:
        """A procedural hint for a failed attempt: the failing input, what came back, what was expected, the step.

        With `completion`, the failing call is re-run in the sandbox to report the value the attempt returned.
        """
        step = f"Hint: {example.meta.get('step', '')}".rstrip()
        status = getattr(result, "status", "error")
        if status == "passed":
            return "All tests passed."
        if status == "timeout":
            return f"Your function did not finish within {self.timeout_s:g} s; make sure every loop ends. {step}"
        if status == "memory":
            return f"Your function used more than {self.memory_mb} MB of memory. {step}"
        if status == "killed":
            return f"Your program was killed (too many processes, or a signal). {step}"
        case = self._failed_case(example, result)
        error = _error_line(getattr(result, "stderr", "") or "", case["index"] if case else None)
        if case is None:
            detail = f"Your code failed before the tests ran ({error})." if error else "Your code did not run."
            return f"{detail} {step}"
        if error and not error.startswith("AssertionError"):
            return f"Calling {case['call']} raised {error}; the expected value is {case['expected']}. {step}"
        returned = _assertion_value(error)
        if returned is None and completion is not None:
            returned = self._returned_value(example, completion, case["call"])
        if returned is not None:
            return (
                f"Your function returned {returned} for input {case['call']}; the expected value is "
                f"{case['expected']}. {step}"
            )
        return f"For input {case['call']} your function did not return the expected value {case['expected']}. {step}"

    def _returned_value(self, example: Example, completion: str, call: str) -> str | None:
        """Run `call` on the attempt in the sandbox and return the repr it printed (None when that fails)."""
        from evaluation.sandbox import run_code

        program = self.program(example, completion)
        if program is None:
            return None
        try:
            result = run_code(f"{program}\nprint(repr({call}))\n", None, **self._limits())
        except Exception:  # a hint is best effort
            logger.debug("code: re-running the failing call failed", exc_info=True)
            return None
        lines = (result.stdout or "").strip().splitlines()
        return lines[-1] if result.passed and lines else None


def _parse_assert(test: str) -> dict[str, str] | None:
    """`{"call", "expected"}` from an `assert call == expected` snippet, or None."""
    try:
        node = ast.parse(test.strip()).body[0]
    except (SyntaxError, IndexError, ValueError):
        return None
    if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.comparators) == 1:
        return {"call": ast.unparse(node.test.left), "expected": ast.unparse(node.test.comparators[0])}
    return None


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


def _error_line(stderr: str, test_index: int | None = None) -> str:
    """The `SomeError: message` line that ended the traceback of test `test_index` (else the last one), or ''.

    The sandbox names test code `<test i>` in tracebacks; tracebacks of several failed tests follow each other.
    """
    blocks = stderr.split("Traceback (most recent call last):")
    if test_index is not None:
        marked = [block for block in blocks if f'"<test {test_index}>"' in block]
        blocks = marked or blocks
    for block in reversed(blocks):
        for line in reversed(block.strip().splitlines()):
            if _ERROR_LINE.match(line.strip()):
                return line.strip()
    return ""


def _assertion_value(error: str) -> str | None:
    """The value carried by `AssertionError: value` (as a test with a message would raise), else None."""
    match = re.match(r"AssertionError:\s*(.+)$", error)
    return match.group(1) if match else None
