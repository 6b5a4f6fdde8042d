"""Evaluation: the task harness and eval-task registry, the lm-eval adapter, the code sandbox, task families,
HumanEval, pass@k, perplexity and the built-in corpus."""

from .benchmarks import (
    EVAL_TASKS,
    PHASE6_SUITE,
    BenchmarkUnavailableError,
    EvalDoc,
    EvalTask,
    examples_task,
    get_eval_task,
    register_eval_task,
)
from .harness import (
    composite_score,
    evaluate_folder,
    evaluate_model,
    evaluate_task,
    generate_completions,
    loglikelihoods,
    results_table,
    write_eval_results,
)
from .humaneval import evaluate_completions, humaneval_program, load_humaneval
from .metrics import mean_pass_at_k, pass_at_k
from .perplexity import PerplexityResult, perplexity
from .sandbox import ExecutionResult, SandboxUnavailableError, run_code, run_many

__all__ = [
    "EVAL_TASKS",
    "PHASE6_SUITE",
    "BenchmarkUnavailableError",
    "EvalDoc",
    "EvalTask",
    "ExecutionResult",
    "PerplexityResult",
    "SandboxUnavailableError",
    "composite_score",
    "evaluate_completions",
    "examples_task",
    "evaluate_folder",
    "evaluate_model",
    "evaluate_task",
    "generate_completions",
    "get_eval_task",
    "humaneval_program",
    "load_humaneval",
    "loglikelihoods",
    "mean_pass_at_k",
    "pass_at_k",
    "perplexity",
    "register_eval_task",
    "results_table",
    "run_code",
    "run_many",
    "write_eval_results",
]
