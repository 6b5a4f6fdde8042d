"""Phase 2 search cost: wall time of 50 generations x 8 candidates at the tiny preset (no early stop) and the
fitness-cache hit rate, against the same search without a cache (projected from this run's per-evaluation time).

    OMP_NUM_THREADS=1 python benchmarks/evomerge.py                         # outputs/tiny/phase1, ~3-4 min
    OMP_NUM_THREADS=1 python benchmarks/evomerge.py --generations 20 --early-stop

Goal (issue #5): under 5 minutes on 2 CPU cores. Every candidate is merged (three stages), built and measured:
perplexity on 4,096 validation tokens, answer likelihood on 2 x 32 task examples, a timed forward beside the
fastest parent, parameter bytes. The output goes to a temporary folder; outputs/ is not touched.
"""

import argparse
import tempfile
import time
from pathlib import Path

from trainers.evomerge import run_phase2
from trainers.evomerge_config import EvoMergeConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase1_dir", default="outputs/tiny/phase1")
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--early-stop", action="store_true", help="keep the plateau stop (patience 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (Path(args.phase1_dir) / "speed").is_dir():
        raise SystemExit(f"{args.phase1_dir} has no Phase 1 outputs; run `make demo` first.")
    with tempfile.TemporaryDirectory() as tmp:
        config = EvoMergeConfig(
            output_dir=tmp,
            phase1_dir=args.phase1_dir,
            generations=args.generations,
            population_size=args.population,
            patience=5 if args.early_stop else args.generations,
            seed=args.seed,
            show_progress=False,
        )
        started = time.perf_counter()
        summary = run_phase2(config)
        total = time.perf_counter() - started
    state = summary["state"]
    candidates = state.evaluations + state.cache_hits
    per_eval = sum(h["seconds"] for h in state.history[1:]) / max(sum(h["evaluated"] for h in state.history[1:]), 1)
    no_cache = candidates * per_eval
    print(f"Phase 2 search on {args.phase1_dir}: {state.generation + 1} generations x {args.population} candidates "
          f"(stopped by {state.stopped})")  # fmt: skip
    print(
        f"  search wall time       {state.search_seconds:7.1f} s  ({state.search_seconds / 60:.2f} min; goal < 5 min)"
    )
    print(f"  whole phase            {total:7.1f} s  (loading, parent reference, final test comparison, saving)")
    print(f"  candidates             {candidates:7d}  evaluated {state.evaluations}, cache hits {state.cache_hits}")
    print(f"  fitness-cache hit rate {state.cache_hits / max(candidates, 1):7.1%}")
    print(f"  per evaluation         {per_eval:7.3f} s  (merge + build + measure)")
    saved = 1 - state.search_seconds / no_cache
    print(f"  without the cache      {no_cache:7.1f} s  projected -> the cache saves {saved:.0%}")
    print(f"  champion vs best parent on held-out test data: {summary['improvement_pct']:+.1f}% fitness")


if __name__ == "__main__":
    main()
