"""Phase 7 hand-off: the final model as a self-contained folder that loads and generates on CPU without this package.

    python recipes/export.py --model outputs/tiny/phase6 --output_dir outputs/tiny/export
    python recipes/export.py --model outputs/25m/phase6 --output_dir outputs/25m/export --push_to_hub true \
        --hub_model_id user/forge-25m

Writes the folder atomically after a child Python that cannot import `agent-forge` loaded it with
`trust_remote_code=True` and generated the same greedy tokens as this process; its card carries a size and CPU
latency table (packed ternary vs dense fp32). See `trainers/export.py`.
"""

from transformers import HfArgumentParser

from trainers.export import ExportConfig, export_model


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(ExportConfig)


def main(config: ExportConfig) -> dict:
    summary = export_model(config)
    report = summary["report"]
    print(f"\nExported {config.model} to {summary['output_dir']} ({report['exported_form']})")
    for name, row in report["rows"].items():
        print(f"  {name:<46} {row['checkpoint_bytes']:>12,} bytes  {row['tokens_per_s']:8.1f} tokens/s")
    print(f"  fp32/packed size {report['size_ratio_fp32_over_packed']:.2f}x, packed/fp32 speed "
          f"{report['speed_ratio_packed_over_fp32']:.2f}x")  # fmt: skip
    if report["check"]:
        print(f"  loads without the package: yes; greedy sample {report['check']['greedy_text']!r}")
    return summary


if __name__ == "__main__":
    (config,) = make_parser().parse_args_into_dataclasses()
    main(config)
