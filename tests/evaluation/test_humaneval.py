"""HumanEval loading, program assembly and pass@k: canonical solutions pass in the sandbox, broken ones fail."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from evaluation.humaneval import HumanEvalProblem, evaluate_completions, humaneval_program, load_humaneval
from evaluation.metrics import mean_pass_at_k, pass_at_k
from evaluation.sandbox import run_code

# Ten problems spread across the set (first, last and evenly in between).
SAMPLE = [0, 18, 36, 54, 72, 90, 108, 126, 144, 163]


@pytest.fixture(scope="module")
def problems() -> list[HumanEvalProblem]:
    return load_humaneval()


# ------------------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (5, 0, 3, 0.0),
        (5, 5, 5, 1.0),
        (5, 4, 2, 1.0),  # n - c < k: every pair holds a correct sample
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k)[0] == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_formula_on_a_grid():
    rows = [(n, c) for n in range(1, 25) for c in range(n + 1)]
    n, c = np.array(rows).T
    for k in (1, 2, 5):
        ok = n >= k
        exact = [1 - comb(ni - ci, k) / comb(ni, k) for ni, ci in zip(n[ok], c[ok], strict=True)]
        np.testing.assert_allclose(pass_at_k(n[ok], c[ok], k), exact, rtol=0, atol=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    value = pass_at_k(100_000, 1_000, 1_000)[0]  # binomials of this size overflow floats
    assert np.isfinite(value) and 0.99 < value <= 1.0


def test_pass_at_k_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="at least k"):
        pass_at_k([5, 2], [1, 1], 3)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 0)


def test_mean_pass_at_k_reports_only_ks_every_problem_supports():
    verdicts = {"a": [True, False, False, False], "b": [False] * 4, "c": [True] * 4}
    scores = mean_pass_at_k(verdicts, ks=(1, 2, 10))
    assert set(scores) == {"pass@1", "pass@2"}
    assert scores["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert scores["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 0.5


# ------------------------------------------------------------------------------------------------------ loading
def test_loads_all_164_problems_offline(problems):
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert len({p.task_id for p in problems}) == 164
    for p in problems:
        assert f"def {p.entry_point}(" in p.prompt and "def check(candidate)" in p.test and p.canonical_solution


def test_program_is_prompt_plus_completion_and_a_check_call(problems):
    problem = problems[0]
    code, tests = humaneval_program(problem, "    return True\n")
    assert code == problem.prompt + "    return True\n"
    assert len(tests) == 1 and tests[0].startswith(problem.test)
    assert tests[0].rstrip().endswith("check(has_close_elements)")
    full, _ = humaneval_program(problem, problem.prompt + problem.canonical_solution, includes_prompt=True)
    assert full == problem.prompt + problem.canonical_solution


# ---------------------------------------------------------------------------------------------- in the sandbox
def test_canonical_solutions_pass_in_the_sandbox(problems):
    chosen = [problems[i] for i in SAMPLE]
    scores, results = evaluate_completions(chosen, {p.task_id: [p.canonical_solution] for p in chosen}, ks=(1,))
    failures = {t: (rs[0].status, rs[0].stderr[-300:]) for t, rs in results.items() if not rs[0].passed}
    assert failures == {}
    assert scores == {"pass@1": 1.0}
    assert all(rs[0].tests_passed == [0] for rs in results.values())


def test_broken_solution_fails_with_the_failing_test_reported(problems):
    problem = problems[0]  # has_close_elements: the first assertion expects True, the second False
    code, tests = humaneval_program(problem, "    return True\n")
    result = run_code(code, tests)
    assert result.status == "failed" and result.tests_failed == [0]
    assert result.failed_test == tests[0]
    assert "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False" in result.stderr
    assert "AssertionError" in result.stderr


def test_pass_at_k_over_mixed_samples(problems):
    problem = problems[0]
    samples = [problem.canonical_solution, "    return True\n", "    return (\n", problem.canonical_solution]
    scores, results = evaluate_completions([problem], {problem.task_id: samples}, ks=(1, 2, 5))
    assert [r.status for r in results[problem.task_id]] == ["passed", "failed", "error", "passed"]
    assert scores == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1 - 1 / 6)}  # 1 - C(2,2)/C(4,2)


def test_unknown_task_ids_are_rejected(problems):
    with pytest.raises(KeyError, match="HumanEval/999"):
        evaluate_completions(problems[:1], {"HumanEval/999": ["pass"]})
