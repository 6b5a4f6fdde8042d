"""Phase 6 (tool and persona baking): A/B cycles of half-baked tool-use prompts and self-descriptions.

    python recipes/phase6.py --config recipes/configs/phase6_tiny.yaml
    python recipes/phase6.py --config recipes/configs/phase6_tiny.yaml --resume true     # continue a cut run
    python recipes/phase6.py --config recipes/configs/phase6_cognate25m.yaml --humaneval true

Reads `--model_name_or_path` (the Phase 5 folder, or any Forge folder; a packed BitNet model is baked through its
shadow weights and packed again), runs A-cycles (tool-use prompts half-baked, scored on held-out code tasks in the
sandbox, HumanEval with `--humaneval true`) and B-cycles (the model's self-descriptions scored on the task suite, the
best half-baked) until both plateau, keeping a bake only on a paired gain whose bootstrap interval excludes zero.
Writes `<output_dir>/` (loads with AutoModelForCausalLM; card with the A/B history; ab_history.json; plots).
"""

from trl import TrlParser

from trainers.persona_config import PersonaConfig
from trainers.persona_trainer import run_phase6


def make_parser() -> TrlParser:
    return TrlParser((PersonaConfig,))


def main(config: PersonaConfig) -> dict:
    summary = run_phase6(config)
    h = summary["history"]
    print(f"\nPhase 6 (tool and persona baking) written to {summary['output_dir']} in {summary['wall_time_s']:.0f} s")
    print(f"  {len(h['cycles'])} cycles, stopped by {h['stopped']}; {len(h['baked'])} bake(s) kept")
    for c in h["cycles"]:
        print(f"  cycle {c['cycle']} {c['kind']}: gain {c['gain']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
              f"{'kept' if c['kept'] else 'not kept'}: {c['winner'][:70]!r}")  # fmt: skip
    for kind, label in (("A", "code pass@1"), ("B", "suite score")):
        print(f"  {label}: input {h['input_scores'][kind]:.4f} -> {h['final_scores'][kind]:.4f}")
    return summary


if __name__ == "__main__":
    (config,) = make_parser().parse_args_and_config()
    main(config)
