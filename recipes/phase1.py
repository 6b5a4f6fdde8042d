"""Phase 1 (Cognate): pretrain the reasoning, memory and speed specialisations from one shared initialisation.

    python recipes/phase1.py --config recipes/configs/phase1_tiny.yaml
    accelerate launch recipes/phase1.py --config recipes/configs/phase1_tiny.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/phase1.py \
        --config recipes/configs/phase1_cognate25m.yaml
    python recipes/phase1.py --config recipes/configs/phase1_tiny.yaml --resume      # continue an interrupted run

Writes `<output_dir>/phase1/{init,reasoning,memory,speed}/` (each loads with AutoModelForCausalLM and carries a
model card and forge_lineage.json) and `<output_dir>/phase1/diversity_report.json`. `--push_to_hub` uploads each
finished specialisation to `<hub_model_id>-phase1-<name>`.
"""

import json

from trl import TrlParser

from trainers.cognate_config import CognateConfig
from trainers.cognate_trainer import run_phase1
from trainers.config_fields import parse_recipe_config


def make_parser() -> TrlParser:
    return TrlParser((CognateConfig,))


def main(config: CognateConfig) -> dict:
    summary = run_phase1(config)
    print(f"\nPhase 1 results in {summary['output_dir']}")
    for name, metrics in summary["specializations"].items():
        steps = [v for k, v in sorted(metrics.items()) if k.startswith("eval/loss_step_")]
        print(f"  {name:>10}: validation perplexity {metrics['eval/perplexity']:8.2f}, "
              f"loss per TRM step {', '.join(f'{v:.3f}' for v in steps)}, "
              f"ACT mean halting step {metrics['eval/act_avg_steps']:.2f}")  # fmt: skip
    if "diversity" in summary:
        print(f"  diverged: {summary['diversity']['diverged']}")
        print(json.dumps(summary["diversity"]["pairs"], indent=2))
    return summary


if __name__ == "__main__":
    (config,) = parse_recipe_config(make_parser())
    main(config)
