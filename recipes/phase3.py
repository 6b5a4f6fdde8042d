"""Phase 3 (Quiet-STaR): bake reasoning with thoughts into a model, then train it to use its thoughts.

    python recipes/phase3.py --config recipes/configs/phase3_tiny.yaml
    python recipes/phase3.py --config recipes/configs/phase3_tiny.yaml \
        --model_name_or_path outputs/tiny/phase1/reasoning                     # skip Phase 2
    python recipes/phase3.py --config recipes/configs/phase3_tiny.yaml --teacher model \
        --teacher_model_name_or_path path/to/causal-lm                       # a local LM writes the thoughts
    python recipes/phase3.py --config recipes/configs/phase3_tiny.yaml --teacher openai \
        --teacher_base_url http://localhost:8000/v1 --teacher_model my-model  # an OpenAI-compatible endpoint

Reads `--model_name_or_path` (any Forge folder or Hub id), adds the 12 thought tokens if missing, bakes the
teacher's reasoning examples (step 1), trains Quiet-STaR thoughts with a mixing head (step 2) with anti-theater
checks, and writes `<output_dir>/phase3/` (loads with AutoModelForCausalLM; model card with the baking KL, the RL
reward curve, the anti-theater results and before/after answer NLL and accuracy with and without thoughts;
forge_lineage.json; anti_theater.json). `--push_to_hub true` uploads it to `<hub_model_id or run name>-phase3`.
"""

from trl import TrlParser

from trainers.config_fields import parse_recipe_config
from trainers.quietstar_config import QuietStarConfig
from trainers.quietstar_trainer import run_phase3


def make_parser() -> TrlParser:
    return TrlParser((QuietStarConfig,))


def main(config: QuietStarConfig) -> dict:
    summary = run_phase3(config)
    if not summary.get("main_process", True):  # another rank measured and wrote
        return summary
    metrics = summary["metrics"]
    print(f"\nPhase 3 (Quiet-STaR) written to {summary['output_dir']} in {summary['wall_time_s']:.0f} s")
    if "bake/strength" in metrics:
        print(
            f"  step 1 bake: cross-entropy {metrics['bake/kl_before']:.3f} -> {metrics['bake/kl_after']:.3f} "
            f"nats/token (strength {metrics['bake/strength']:.3f})"
        )
    print(f"  {'':>28} {'input':>8} {'before RL':>10} {'after RL':>9}")
    for key in (
        "answer_nll_without_thoughts",
        "answer_nll_with_thoughts",
        "accuracy_without_thoughts",
        "accuracy_with_thoughts",
    ):
        values = [metrics.get(f"{stage}/{key}") for stage in ("input", "before_rl", "after_rl")]
        print(f"  {key:>28} " + " ".join(f"{v:>9.4f}" if v is not None else f"{'-':>9}" for v in values))
    final = summary["anti_theater"][-1]
    for name, check in final["checks"].items():
        print(
            f"  anti-theater {name}: {check['value']:.4f} (threshold {check['threshold']:.4f}) "
            f"{'pass' if check['passed'] else 'FAIL'}"
        )
    return summary


if __name__ == "__main__":
    (config,) = parse_recipe_config(make_parser())
    main(config)
