"""Phase 4 (BitNet b1.58): ternary weights, STE fine-tuning, a 2-bit packed checkpoint.

    python recipes/phase4.py --config recipes/configs/phase4_tiny.yaml
    accelerate launch recipes/phase4.py --config recipes/configs/phase4_tiny.yaml
    python recipes/phase4.py --config recipes/configs/phase4_cognate25m.yaml --model_name_or_path outputs/25m/phase3
    python recipes/phase4.py --config ... --resume_from_checkpoint outputs/25m/.phase4-work/checkpoint-500  # continue

Reads `--model_name_or_path` (a previous phase's folder or Hub id), quantizes its linear layers one at a time to
{-1, 0, +1} (layers that hurt the calibration loss beyond the threshold stay in full precision), fine-tunes the
shadow weights with MuGrokfast in STE mode while distilling from the full-precision model, and writes
`<output_dir>/` (loads with AutoModelForCausalLM; model card, forge_lineage.json, bitnet_report.json,
plots/bitnet_layers.png). Unset size-dependent fields come from `trainers.size_aware`. `--push_to_hub true`
uploads the folder to `--hub_model_id`.
"""

from trl import TrlParser

from trainers.bitnet_config import BitNetConfig
from trainers.bitnet_trainer import run_phase4
from trainers.config_fields import parse_recipe_config


def make_parser() -> TrlParser:
    return TrlParser((BitNetConfig,))


def main(config: BitNetConfig) -> dict:
    summary = run_phase4(config)
    report = summary.get("report")
    if report is None:  # not the main process
        return summary
    storage, ternary, quality = report["storage"], report["ternary"], report["quality"]
    print(f"\nPhase 4 (BitNet b1.58) written to {summary['output_dir']}")
    print(
        f"  checkpoint {storage['checkpoint_file_bytes']:,} bytes: {storage['compression_vs_fp32']:.2f}x smaller "
        f"than fp32, {storage['compression_vs_fp16']:.2f}x than fp16 (target {storage['compression_target']}x, "
        f"met: {storage['target_met']}); embedding stored in {storage['embedding_bits']} bits"
    )
    print(
        f"  ternary layers {ternary['layers']} ({ternary['share_of_parameters']:.1%} of parameters, "
        f"{ternary['sparsity']:.1%} zeros); full-precision fallbacks: {ternary['fallback_layers'] or 'none'}"
    )
    for stage in ("full_precision", "post_training_quantization", "bitnet"):
        q = quality[stage]
        print(f"  {stage:>26}: perplexity {q['perplexity']:9.3f}  token accuracy {q['token_accuracy']:.4f}")
    if report["speed"]:
        speed = report["speed"]
        print(f"  decode (batch 1, CPU): fp32 {speed['fp32_tokens_per_s']:.1f} tok/s, packed "
              f"{speed['packed_tokens_per_s']:.1f} tok/s ({speed['packed_vs_fp32']:.2f}x)")  # fmt: skip
    return summary


if __name__ == "__main__":
    (config,) = parse_recipe_config(make_parser())
    main(config)
