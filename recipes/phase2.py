"""Phase 2 (EvoMerge): evolve merge recipes of the three Phase 1 models and keep the champion.

    python recipes/phase2.py --config recipes/configs/phase2_tiny.yaml
    python recipes/phase2.py --config recipes/configs/phase2_tiny.yaml --resume        # continue an interrupted search
    python recipes/phase2.py --config recipes/configs/phase2_tiny.yaml --phase1_dir outputs/tiny/phase1 \
        --output_dir outputs/tiny --generations 20
    python recipes/phase2.py --parents A B C --base_model INIT --output_dir outputs/run  # explicit checkpoints

Reads `<phase1_dir>/{reasoning,memory,speed}` (their common init is found in their lineage) and writes
`<output_dir>/phase2/champion/` (loads with AutoModelForCausalLM; card with the champion's recipe and the fitness
history), `<output_dir>/phase2/evolution.jsonl` (every candidate) and `<output_dir>/phase2/plots/fitness.png`.
"""

from trl import TrlParser

from trainers.config_fields import parse_recipe_config
from trainers.evomerge import run_phase2
from trainers.evomerge_config import EvoMergeConfig


def make_parser() -> TrlParser:
    return TrlParser((EvoMergeConfig,))


def main(config: EvoMergeConfig) -> dict:
    summary = run_phase2(config)
    if not summary.get("main_process", True):  # another rank searched and wrote
        return summary
    state = summary["state"]
    print(f"\nPhase 2 champion in {summary['output_dir']} (base {summary['base_model']})")
    print(f"  search: {state.generation + 1} generations, stopped by {state.stopped}, {state.evaluations} evaluated, "
          f"{state.cache_hits} cache hits, {state.search_seconds:.0f} s")  # fmt: skip
    metrics = summary["metrics"]
    print(f"  validation (selection) fitness: champion {metrics['search/validation_fitness']:.4f}, best parent "
          f"{metrics['search/best_parent_validation_fitness']:.4f}")  # fmt: skip
    print("  held-out test comparison:")
    for row in summary["comparison"]:
        print(f"    {row['model']:>10}: fitness {row['fitness']:.4f}  perplexity {row['perplexity']:8.2f}  "
              f"task acc {row['task_accuracy']:.3f}  answer p {row['task_likelihood']:.4f}  "
              f"{row['mflops_per_token']:.3f} MFLOP/token  {row['tokens_per_s']:8.0f} tok/s  "
              f"{row['parameter_mb']:.3f} MB")  # fmt: skip
    print(f"  champion vs best parent ({summary['best_parent']}): {summary['improvement_pct']:+.1f}% fitness")
    return summary


if __name__ == "__main__":
    (config,) = parse_recipe_config(make_parser())
    main(config)
