"""Phase 5 (curriculum): the model learns to code at the edge of its ability, with a sandboxed tool, hints, baking,
self-modeling and dreams.

    python recipes/phase5.py --config recipes/configs/phase5_tiny.yaml
    accelerate launch recipes/phase5.py --config recipes/configs/phase5_cognate25m.yaml
    python recipes/phase5.py --config recipes/configs/phase5_cognate25m.yaml --resume true   # after a crash

Reads `--model_name_or_path` (Phase 4's ternary folder, or any Forge folder), measures pass@k per code level in the
sandbox and starts at the edge of ability; per level the model writes code that runs only in the sandbox (bubblewrap;
`--require_isolation false` accepts the weaker fallback), successes become variants and then leave the pool, failures
get a hint and a retry, and it trains on its successes (hinted ones without the hint) with MuGrokfast in STE mode.
After each level: half-bakes of the eudaimonia, OODA and identity prompts, self-modeling in temperature bands, a dream
epoch on the model's own programs for earlier levels' tasks that pass their tests in the sandbox. Writes
`<output_dir>/` (packed, loads with AutoModelForCausalLM; card, forge_lineage.json, curriculum_report.json, plots/).
`--resume true` continues after the last finished level.
"""

from trl import TrlParser

from trainers.curriculum_config import CurriculumConfig
from trainers.curriculum_trainer import run_phase5


def make_parser() -> TrlParser:
    return TrlParser((CurriculumConfig,))


def main(config: CurriculumConfig) -> dict:
    summary = run_phase5(config)
    report = summary.get("report")
    if report is None:  # not the main process
        return summary
    placement, totals = report["placement"], report["totals"]
    print(f"\nPhase 5 (curriculum) written to {summary['output_dir']} in {summary['wall_time_s']:.0f} s")
    rates = ", ".join(f"L{lv} {v['pass@1']:.2f}" for lv, v in placement["per_level"].items())
    print(f"  placement pass@1: {rates} -> start at level {placement['start_level']}")
    for level, values in report["success"].items():
        after = "-" if values["after"] is None else f"{values['after']:.3f}"
        print(f"  level {level}: held-out pass@1 {values['before']:.3f} -> {after}")
    for record in report["records"]:
        pool = record["pool"]
        rounds = len(record["rounds"])
        print(f"  level {record['level']}: {rounds} rounds, pool {pool['initial']} -> {pool['active']}, "
              f"{pool['hints']} hints, {pool['hinted_successes']} hinted successes")  # fmt: skip
    bwt = report["backward_transfer"]["bwt"]
    print(f"  backward transfer: {'n/a (one level)' if bwt is None else f'{bwt:+.3f}'}")
    if totals["hinted_attempts_per_rung"]:
        print(f"  hint ladder {totals['hint_solution_fractions']}: hinted successes per rung "
              f"{totals['hinted_successes_per_rung']} of {totals['hinted_attempts_per_rung']}")  # fmt: skip
    if totals.get("success_variants"):
        print(f"  constant variants: {totals['variant_pairs_trained']} of {totals['variant_candidates']} rewritten "
              "programs passed their variant's tests and were trained")  # fmt: skip
    print(f"  sandbox: {totals['programs_run']} programs; loop {totals['loop_programs_per_s'] or 0:.2f} programs/s")
    return summary


if __name__ == "__main__":
    (config,) = make_parser().parse_args_and_config()
    main(config)
