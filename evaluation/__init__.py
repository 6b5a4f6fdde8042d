"""Evaluation: the code sandbox, task families, HumanEval, pass@k, perplexity and the built-in corpus."""

from .humaneval import evaluate_completions, humaneval_program, load_humaneval
from .metrics import mean_pass_at_k, pass_at_k
from .perplexity import PerplexityResult, perplexity
from .sandbox import ExecutionResult, SandboxUnavailableError, run_code, run_many

__all__ = [
    "ExecutionResult",
    "PerplexityResult",
    "SandboxUnavailableError",
    "evaluate_completions",
    "humaneval_program",
    "load_humaneval",
    "mean_pass_at_k",
    "pass_at_k",
    "perplexity",
    "run_code",
    "run_many",
]
