"""Shared timing helper for the benchmarks (run by hand, never by the test suite)."""

import statistics
import time
from collections.abc import Callable


def time_it(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of `fn()` in seconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
