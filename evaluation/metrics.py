"""pass@k, the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", §2.1).

With n samples per problem of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k): the probability that at least
one of k samples drawn without replacement is correct. The binomials overflow for realistic n, so we use the
paper's product form 1 - prod_{i=n-c+1}^{n} (1 - k/i), exact in floating point to ~1e-15.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def _pass_at_k_one(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0  # every draw of k samples contains a correct one
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(num_samples: int | Sequence[int], num_correct: int | Sequence[int], k: int) -> np.ndarray:
    """Unbiased pass@k for each problem, from its sample count n and correct count c (scalars broadcast)."""
    n = np.atleast_1d(np.asarray(num_samples, dtype=np.int64))
    c = np.atleast_1d(np.asarray(num_correct, dtype=np.int64))
    n, c = np.broadcast_arrays(n, c)
    if k < 1:
        raise ValueError(f"k={k}: pass@k needs k >= 1")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("num_correct must lie between 0 and num_samples for every problem")
    if np.any(n < k):
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem; got min n={int(n.min())}")
    return np.array([_pass_at_k_one(int(ni), int(ci), k) for ni, ci in zip(n, c, strict=True)], dtype=np.float64)


def mean_pass_at_k(correct: Mapping[str, Sequence[bool]], ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over problems from per-sample verdicts; each k is reported only when every problem has >= k."""
    if not correct:
        return {}
    n = np.array([len(v) for v in correct.values()])
    c = np.array([sum(bool(x) for x in v) for v in correct.values()])
    return {f"pass@{k}": float(pass_at_k(n, c, k).mean()) for k in ks if (n >= k).all()}
