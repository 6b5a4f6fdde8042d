"""The whole pipeline, Phases 1 -> 6, each reading the previous phase's folder; finished phases are skipped.

    python recipes/pipeline.py --config recipes/configs/pipeline_tiny.yaml              # what `make demo` runs
    python recipes/pipeline.py --config recipes/configs/pipeline_tiny.yaml --from_phase 5 --to_phase 6
    python recipes/pipeline.py --config recipes/configs/pipeline_cognate25m.yaml        # the 25M model, on a GPU
    python recipes/pipeline.py --config ... --push_to_hub true --hub_model_id user/forge

Runs `trainers.pipeline.run_pipeline`: each phase's own trainer with its YAML (named in the pipeline YAML) chained to
the run folder, a cut phase resumed, then every phase's model evaluated on the same test-split tasks. Writes
`<output_dir>/pipeline_report.md` (+ `plots/pipeline_scores.png`) and keeps `<output_dir>/pipeline_state.json` up to
date while it runs (format: `trainers/pipeline.py`). `rm -rf <output_dir>` starts over.
"""

import sys

from trl import TrlParser

from trainers.pipeline import PHASES, PipelineConfig, run_pipeline


def make_parser() -> TrlParser:
    return TrlParser((PipelineConfig,))


def main(config: PipelineConfig) -> dict:
    summary = run_pipeline(config)
    state = summary["state"]
    print(f"\nPipeline run in {summary['run_dir']}")
    for number, spec in PHASES.items():
        entry = state["phases"][str(number)]
        seconds = f"{entry['seconds']:.0f} s" if entry["seconds"] is not None else ""
        print(f"  phase {number} {spec.name:<11} {entry['status']:<9} {seconds:>7}  {entry['note'] or ''}")
    if summary.get("report"):
        print(f"\nReport: {summary['report']}\n")
        lines = open(summary["report"]).read().split("\n")
        start = lines.index("## Shared evaluation")
        end = lines.index("", start + 2)
        print("\n".join(lines[start + 2 : end]))
    return summary


if __name__ == "__main__":
    (config,) = make_parser().parse_args_and_config()
    if config.config_file is None and "--config" in sys.argv:
        config.config_file = sys.argv[sys.argv.index("--config") + 1]
    main(config)
