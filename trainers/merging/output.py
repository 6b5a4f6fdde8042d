"""Turn a recipe into a Hub-compatible folder: merge, build the model, save it through `save_phase_output` with a
card that embeds the recipe."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer
from transformers.utils import logging

from ..phase_output import save_phase_output
from .core import Checkpoint, build_model
from .recipe import MergeRecipe, run_recipe

logger = logging.get_logger(__name__)


def merged_model(recipe: MergeRecipe, checkpoints: Mapping[str, Checkpoint] | None = None):
    """Run the recipe and build the merged `ForgeForCausalLM` (in the recipe's dtype, eval mode)."""
    return build_model(run_recipe(recipe, checkpoints), recipe.dtype)


def recipe_card_sections(recipe: MergeRecipe) -> dict[str, Any]:
    """What the merge card shows: the recipe YAML and one line per stage."""
    stages = [
        {
            "name": stage.name or f"stage{i}",
            "method": stage.merge_method,
            "description": stage.method.description,
            "base_model": stage.base_model,
            "inputs": stage.references(),
        }
        for i, stage in enumerate(recipe.stages)
    ]
    return {"recipe_yaml": recipe.to_yaml(), "stages": stages}


def write_merge(
    recipe: MergeRecipe,
    out_dir: str | Path,
    *,
    metrics: Mapping[str, float] | None = None,
    eval_results: list[dict] | None = None,
    evaluate: Callable[[Any, Any], tuple[dict, list[dict]]] | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    model_name: str | None = None,
) -> Path:
    """Merge and write `out_dir` (phase 2, card template `merge`); `evaluate(model, tokenizer)` may add metrics."""
    started = time.time()
    model = merged_model(recipe)
    tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer_folder())
    metrics = {"parameters": float(sum(p.numel() for p in model.parameters())), **(metrics or {})}
    eval_results = list(eval_results or [])
    if evaluate is not None:
        measured, entries = evaluate(model, tokenizer)
        metrics.update(measured)
        eval_results.extend(entries)
    inputs = [ref for ref in recipe.sources() if Path(ref).is_dir()]
    return save_phase_output(
        out_dir,
        model=model,
        tokenizer=tokenizer,
        phase=2,
        phase_name="merge",
        config={"recipe": recipe.to_dict()},
        inputs=inputs,
        metrics=metrics,
        eval_results=eval_results,
        wall_time_s=time.time() - started,
        tags=["merge", *dict.fromkeys(stage.merge_method for stage in recipe.stages)],
        card_sections=recipe_card_sections(recipe),
        card_template="merge",
        model_name=model_name or f"forge-merge-{recipe.stages[-1].merge_method}",
        overwrite=overwrite,
        push_to_hub=push_to_hub,
    )


def corpus_perplexity(eval_tokens: int, seq_len: int = 256) -> Callable[[Any, Any], tuple[dict, list[dict]]]:
    """An `evaluate` for `write_merge`: perplexity on the built-in validation corpus (metrics and model-index)."""

    def evaluate(model, tokenizer) -> tuple[dict, list[dict]]:
        from evaluation.corpus import corpus_texts
        from evaluation.perplexity import perplexity

        texts = corpus_texts("validation", max_chars=8 * eval_tokens)
        result = perplexity(model, tokenizer, texts, max_length=seq_len, stride=seq_len, max_tokens=eval_tokens)
        entry = {"dataset": "agent-forge/shakespeare", "split": "validation", "metric": "perplexity",
                 "value": result.perplexity}  # fmt: skip
        return {"eval/perplexity": result.perplexity, "eval/perplexity_tokens": result.n_tokens}, [entry]

    return evaluate


__all__ = ["corpus_perplexity", "merged_model", "recipe_card_sections", "write_merge"]
