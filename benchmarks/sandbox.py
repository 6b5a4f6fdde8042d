"""Code-sandbox throughput and per-program overhead against a bare `subprocess.run([python, "-c", code])`.

Every runner is measured in the same run on the same interpreter (the base interpreter the sandbox uses), interleaved
program by program so that load from other jobs hits all of them alike; latencies are medians, throughputs the
median of three rounds. Ratios are time per program relative to a baseline (>1: the sandbox costs more). Two
baselines: `python -c` as the brief names it (which also runs `site`, here ~25 ms of .pth imports), and
`python -I -S -c` with the sandbox's own interpreter flags, which isolates the sandbox's own cost.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sandbox.py            # ~1 min on 2 cores
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sandbox.py --n 200 --workers 4
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from evaluation import sandbox
from evaluation.humaneval import humaneval_program, load_humaneval
from evaluation.sandbox import run_code, run_many

TRIVIAL = "print(sum(range(100)))"
Program = tuple[str, list[str] | None]


def bare(python: str, flags: list[str]) -> Callable[[str, list[str] | None], bool]:
    """A baseline runner: the program with its tests appended, in a plain child process, nothing contained."""

    def run(code: str, tests: list[str] | None) -> bool:
        source = "\n".join([code, *(tests or [])])
        return subprocess.run([python, *flags, "-c", source], capture_output=True, timeout=60).returncode == 0

    return run


def sandboxed(mode: str) -> Callable[[str, list[str] | None], bool]:
    def run(code: str, tests: list[str] | None) -> bool:
        return run_code(code, tests, isolation=mode).passed

    return run


def latencies_ms(runners: dict[str, Callable], program: Program, n: int) -> dict[str, float]:
    """Median wall milliseconds per program, one at a time, runners interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(n):
        for name, run in runners.items():
            start = time.perf_counter()
            assert run(*program), name
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def throughputs(runners: dict[str, Callable], program: Program, n: int, workers: int) -> dict[str, float]:
    """Programs per second with `workers` concurrent programs (run_many for the sandbox), median of 3 rounds."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    batch = [program] * n
    for _ in range(3):
        for name, run in runners.items():
            start = time.perf_counter()
            if name.startswith("sandbox"):
                results = run_many(batch, max_workers=workers, isolation=name.split()[-1])
                assert all(r.passed for r in results), name
            else:
                with ThreadPoolExecutor(workers) as pool:
                    assert all(pool.map(lambda p, r=run: r(*p), batch)), name
            rates[name].append(n / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="programs per runner and measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="concurrent programs")
    args = parser.parse_args()
    logging.getLogger("evaluation.sandbox").setLevel(logging.ERROR)  # the fallback's warning is expected here

    python = sandbox._default_python()
    problem = load_humaneval()[0]
    workloads = {
        "trivial program": (TRIVIAL, None),
        f"{problem.task_id} canonical + tests": humaneval_program(problem, problem.canonical_solution),
    }
    modes = ["bwrap", "rlimits"] if sandbox.isolation_available() else ["rlimits"]
    baselines = {"bare python -c": bare(python, []), "bare python -I -S -c": bare(python, ["-I", "-S"])}
    runners = {**baselines, **{f"sandbox {mode}": sandboxed(mode) for mode in modes}}
    for run in runners.values():  # warm up: interpreter probe, bwrap self-check, page cache
        run(*workloads["trivial program"])

    print(f"interpreter {python}; {os.cpu_count()} CPUs; n={args.n}; {args.workers} concurrent for throughput")
    for title, program in workloads.items():
        lat = latencies_ms(runners, program, args.n)
        rate = throughputs(runners, program, args.n, args.workers)
        print(f"\n== {title} ==")
        header = f"{'ms/program':>10} {'x -c':>6} {'x -I -S':>8} {'programs/s':>11} {'x -c':>6} {'x -I -S':>8}"
        print(f"{'runner':<22} {header}")
        for name in runners:
            ratios_lat = [lat[name] / lat[b] for b in baselines]
            ratios_rate = [rate[b] / rate[name] for b in baselines]
            print(
                f"{name:<22} {lat[name]:>10.1f} {ratios_lat[0]:>6.2f} {ratios_lat[1]:>8.2f} "
                f"{rate[name]:>11.1f} {ratios_rate[0]:>6.2f} {ratios_rate[1]:>8.2f}"
            )


if __name__ == "__main__":
    main()
