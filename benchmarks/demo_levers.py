"""Which Phase 1 levers make the tiny demo's tasks learnable: train specialisations of `phase1_tiny.yaml` with
overrides, then score them on VALIDATION items (the demo's report uses test items; no choice is tuned on those).

    OMP_NUM_THREADS=1 nice python benchmarks/demo_levers.py --specs memory                          # the YAML as is
    python benchmarks/demo_levers.py --specs memory --set 'model_overrides={"mag_mix": "raw"}'
    python benchmarks/demo_levers.py --specs memory --prompt_loss true --set learning_rate=3e-3

Each run writes `<output_dir>/<name>/phase1/<spec>` and prints one line: exact match per task on `--limit` validation
items (greedy, 48 new tokens, as the pipeline's evaluation), corpus perplexity and the training CPU seconds. The
figures quoted in `recipes/configs/phase1_tiny.yaml` came from this procedure (on a shared machine).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

import trainers.cognate_trainer as cognate
from evaluation.benchmarks import get_eval_task
from evaluation.harness import evaluate_folder
from trainers.cognate_config import CognateConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/configs/phase1_tiny.yaml")
    parser.add_argument("--specs", default="memory", help="Comma-separated specialisations to train.")
    parser.add_argument("--set", nargs="*", default=[], help="CognateConfig overrides, field=YAML value.")
    parser.add_argument("--prompt_loss", choices=["true", "false"], help="Override every curriculum stage's value.")
    parser.add_argument("--tasks", default="arithmetic,kv_recall")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--output_dir", default="outputs/demo_levers")
    parser.add_argument("--name", default="run")
    args = parser.parse_args()

    values = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    if args.prompt_loss:
        values["curriculum"] = [{**stage, "prompt_loss": args.prompt_loss == "true"} for stage in values["curriculum"]]
    specs = args.specs.split(",")
    values["specializations"] = {name: values["specializations"][name] for name in specs}
    run_dir = Path(args.output_dir) / args.name
    shutil.rmtree(run_dir, ignore_errors=True)
    values["output_dir"] = str(run_dir)
    # The diversity report compares specialisations pairwise; a lever run may train one.
    cognate.diversity_report = lambda *a, **k: {"diverged": None, "pairs": {}}
    cognate.write_diversity_report = lambda *a, **k: None
    cpu = time.process_time()
    cognate.run_phase1(CognateConfig(**values))
    train_cpu = time.process_time() - cpu
    tasks = [get_eval_task(name, split="validation", difficulty=1) for name in args.tasks.split(",")]
    for spec in specs:
        folder = run_dir / "phase1" / spec
        scores = evaluate_folder(folder, tasks, limit=args.limit, batch_size=16, seed=0, max_new_tokens=48)
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        row = {name: round(r["score"], 3) for name, r in scores.items()}
        row["perplexity"] = round(metrics["eval/perplexity"], 1)
        print(f"{args.name} {spec}: {json.dumps(row)} train CPU {train_cpu:.0f} s (all specialisations)")


if __name__ == "__main__":
    main()
