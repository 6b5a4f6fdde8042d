"""Evaluate a checkpoint folder on eval tasks; print a table, write JSON, record the results in the folder's card.

    python recipes/eval.py --model outputs/demo --tasks arithmetic,kv_recall,code,humaneval --limit 20
    python recipes/eval.py --model outputs/demo --tasks arc-easy --data_files arc-easy=arc_easy_test.jsonl
    python recipes/eval.py --model outputs/demo --tasks arc-easy --data_files arc-easy=arc_easy_test.jsonl \
        --backend lm-eval                                        # the same documents through lm-evaluation-harness
    python recipes/eval.py --model outputs/run/phase6 --tasks mmlu,gsm8k,humaneval,math,hellaswag,arc-challenge \
        --weights phase6                                         # Phase 6's weighted composite

Tasks: see `evaluation.benchmarks.EVAL_TASKS`. Hub benchmarks (gsm8k, math, arc-easy, arc-challenge, hellaswag,
mmlu) need the Hub or `--data_files task=rows.jsonl` with the Hub's fields; offline without files they fail at once.
With `--lm_eval_tasks_dir DIR` the exported lm-eval tasks stay in DIR, so lm-eval's own command line runs them too:
`lm_eval --model hf --model_args pretrained=<model>,trust_remote_code=True --include_path DIR --tasks forge_arc_easy`.
Results go to `<model>/eval_results.json`, `<model>/metrics.json` (`eval_results`) and the card's model-index
(`--write_to_model false` to leave the folder alone) and, with `--output_json`, to a report of their own.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from evaluation.benchmarks import PHASE6_SUITE, get_eval_task
from evaluation.harness import composite_score, evaluate_folder, results_table, write_eval_results


@dataclass
class EvalArguments:
    """Command line of `recipes/eval.py`."""

    model: str = field(metadata={"help": "Checkpoint folder (loaded with trust_remote_code=True)."})
    tasks: str = field(default="arithmetic,kv_recall,code", metadata={"help": "Comma-separated eval task names."})
    backend: str = field(default="agent-forge", metadata={"help": "agent-forge (this harness) or lm-eval."})
    limit: int | None = field(default=None, metadata={"help": "Documents per task (built-in tasks: 100 if unset)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts (or choice continuations) per forward batch."})
    data_files: list[str] = field(default_factory=list, metadata={"help": "Local rows per task: task=path ..."})
    difficulty: int | None = field(default=None, metadata={"help": "Difficulty (1-10) of the built-in families."})
    num_samples: int = field(default=1, metadata={"help": "Completions per problem for generative tasks."})
    ks: str = field(default="1", metadata={"help": "Comma-separated k values for pass@k (each <= num_samples)."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (unset: greedy)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Override the tasks' generation budget."})
    weights: str | None = field(default=None, metadata={"help": "`phase6` or task=weight,...: weighted composite."})
    seed: int = field(default=0, metadata={"help": "Seed for built-in documents and sampling."})
    device: str = field(default="cpu", metadata={"help": "Device for the model."})
    write_to_model: bool = field(default=True, metadata={"help": "Record results in the model folder and card."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})
    log_samples: bool = field(default=False, metadata={"help": "Keep per-document records in --output_json."})
    lm_eval_tasks_dir: str | None = field(default=None, metadata={"help": "lm-eval backend: keep task YAMLs here."})

    def __post_init__(self) -> None:
        if self.backend not in ("agent-forge", "lm-eval"):
            raise ValueError(f"--backend {self.backend!r}: use agent-forge or lm-eval.")
        if not Path(self.model).is_dir():
            raise ValueError(f"--model {self.model!r} is not a folder.")
        bad = [item for item in self.data_files if "=" not in item]
        if bad:
            raise ValueError(f"--data_files entries must be task=path, got {bad}.")


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(EvalArguments)


def _weights(spec: str | None) -> dict[str, float] | None:
    if not spec:
        return None
    if spec == "phase6":
        return dict(PHASE6_SUITE)
    return {name.strip(): float(value) for name, value in (item.split("=", 1) for item in spec.split(","))}


def main(args: EvalArguments) -> dict:
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    options = {"difficulty": args.difficulty} if args.difficulty is not None else {}
    tasks = [get_eval_task(name, **options) if "difficulty" in get_eval_task(name).options else name for name in names]
    data_files = dict(item.split("=", 1) for item in args.data_files)
    common = {"limit": args.limit, "batch_size": args.batch_size, "data_files": data_files, "seed": args.seed}
    if args.backend == "agent-forge":
        common |= {
            "num_samples": args.num_samples,
            "ks": tuple(int(k) for k in args.ks.split(",")),
            "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens,
            "log_samples": args.log_samples,
        }
    else:
        common |= {"log_samples": args.log_samples, "work_dir": args.lm_eval_tasks_dir}
    results = evaluate_folder(args.model, tasks, backend=args.backend, device=args.device, **common)
    print(results_table(results))
    report = {"model": args.model, "backend": args.backend, "results": results}
    weights = _weights(args.weights)
    if weights is not None:
        report["composite"] = {"weights": weights, "score": composite_score(results, weights)}
        print(f"\nWeighted composite over {', '.join(weights)}: {report['composite']['score']:.4f}")
    if args.write_to_model:
        path = write_eval_results(args.model, results)
        has_card = (Path(args.model) / "forge_lineage.json").exists()
        card = " and README.md" if has_card else " (no forge_lineage.json: card not re-rendered)"
        print(f"\nRecorded in {path}, {Path(args.model) / 'metrics.json'}{card}.")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"Report written to {args.output_json}")
    return report


if __name__ == "__main__":
    (arguments,) = make_parser().parse_args_into_dataclasses()
    main(arguments)
