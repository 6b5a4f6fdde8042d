"""Merge checkpoints with a mergekit-style recipe and write a Hub-compatible folder (phase 2 hand-off format).

    python recipes/merge.py --recipe my_recipe.yaml --out outputs/tiny/merge/ties
    python recipes/merge.py --config recipes/configs/merge_ties_tiny.yaml              # recipe inline in the config
    python recipes/merge.py --config recipes/configs/merge_dfs_tiny.yaml --eval_tokens 8192 --overwrite

Methods: linear, slerp, task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties (relative to a base_model),
franken, dfs, passthrough (layer slices). The folder loads with AutoModelForCausalLM; its card embeds the recipe and
its forge_lineage.json names every input with its weights hash.
"""

from trl import TrlParser

from trainers.config_fields import parse_recipe_config
from trainers.merging import MergeConfig, corpus_perplexity, write_merge


def make_parser() -> TrlParser:
    return TrlParser((MergeConfig,))


def main(config: MergeConfig) -> str:
    recipe = config.merge_recipe()
    evaluate = corpus_perplexity(config.eval_tokens) if config.eval_tokens else None
    path = write_merge(recipe, config.out, evaluate=evaluate, overwrite=config.overwrite,
                       push_to_hub=config.push_to_hub)  # fmt: skip
    print(f"Merged ({' -> '.join(stage.merge_method for stage in recipe.stages)}) into {path}")
    if evaluate is not None:
        import json

        metrics = json.loads((path / "metrics.json").read_text())["metrics"]
        print(
            f"  validation perplexity {metrics['eval/perplexity']:.2f} on {metrics['eval/perplexity_tokens']} tokens"
        )
    return str(path)


if __name__ == "__main__":
    (config,) = parse_recipe_config(make_parser())
    main(config)
