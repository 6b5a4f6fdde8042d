"""Diversity validation of Phase 1: did the three specialisations really become different models?

Measured on held-out data: halting statistics (ACT), memory-gate usage, pairwise weight distances of the task
vectors (each model minus the shared initialisation), next-token disagreement on validation text, and answer
disagreement / accuracy on validation tasks (long-distance key-value recall included, the memory's test).
"""

import itertools
import json
import math
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)


@torch.no_grad()
def _flat_task_vector(model: PreTrainedModel, init: PreTrainedModel) -> torch.Tensor:
    init_params = dict(init.named_parameters())
    return torch.cat([(p.detach() - init_params[n].detach()).flatten() for n, p in model.named_parameters()])


@torch.no_grad()
def _text_statistics(model: PreTrainedModel, blocks: torch.Tensor) -> dict:
    model.eval()
    out = model(input_ids=blocks, labels=blocks)  # eval mode: ACT halting on, every step's loss measured
    halts = out.halt_steps.flatten()
    steps = out.step_losses.numel()
    return {
        "predictions": out.logits.argmax(-1),
        "avg_halt_step": float(halts.float().mean()),
        "halt_step_distribution": [float((halts == t).float().mean()) for t in range(steps)],
        "m_usage": float(1.0 - out.gate_means.mean()) if out.gate_means is not None else None,
        "gate_means_per_layer": out.gate_means.mean(0).tolist() if out.gate_means is not None else None,
        "step_losses": out.step_losses.tolist(),
        "perplexity": math.exp(float(out.step_losses[-1])),
    }


@torch.no_grad()
def _task_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family, examples, max_new_tokens: int
) -> tuple[list[str | None], float]:
    """Greedy answers (batched, left-padded) and the family's exact-match accuracy."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer([example.prompt for example in examples], return_tensors="pt", padding=True)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    finally:
        tokenizer.padding_side = side
    completions = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    scores = family.score_batch(examples, completions)
    return [family.extract_answer(c) for c in completions], sum(scores) / max(len(scores), 1)


def diversity_report(
    models: dict[str, PreTrainedModel],
    init: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_blocks: torch.Tensor,
    task_examples: dict[str, list] | None = None,
    max_new_tokens: int = 64,
    min_task_vector_distance: float = 0.05,
    min_disagreement: float = 0.01,
) -> dict:
    """Compare the specialised models; `diverged` is False (with a warning) when they are practically the same.

    Thresholds: two models count as different if their task vectors' relative distance
    `||tau_a - tau_b|| / max(||tau_a||, ||tau_b||)` exceeds `min_task_vector_distance` AND they disagree on more than
    `min_disagreement` of the validation next-token predictions.
    """
    from evaluation.tasks import get_task_family

    names = list(models)
    per_model: dict[str, dict] = {}
    predictions, task_vectors, answers = {}, {}, {}
    for name, model in models.items():
        stats = _text_statistics(model, text_blocks)
        predictions[name] = stats.pop("predictions")
        task_vectors[name] = _flat_task_vector(model, init)
        stats["task_vector_norm"] = float(task_vectors[name].norm())
        stats["task_accuracy"] = {}
        for family_name, examples in (task_examples or {}).items():
            family = get_task_family(family_name)
            answers[(name, family_name)], stats["task_accuracy"][family_name] = _task_answers(
                model, tokenizer, family, examples, max_new_tokens
            )
        per_model[name] = stats
    pairs = {}
    for a, b in itertools.combinations(names, 2):
        va, vb = task_vectors[a], task_vectors[b]
        relative = float((va - vb).norm() / max(va.norm(), vb.norm(), torch.tensor(1e-12)))
        cosine = float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
        disagreement = float((predictions[a] != predictions[b]).float().mean())
        answer_disagreement = {
            family: sum(x != y for x, y in zip(answers[(a, family)], answers[(b, family)], strict=True))
            / max(len(answers[(a, family)]), 1)
            for family in (task_examples or {})
        }
        pairs[f"{a}|{b}"] = {
            "task_vector_relative_distance": relative,
            "task_vector_cosine": cosine,
            "next_token_disagreement": disagreement,
            "answer_disagreement": answer_disagreement,
            "different": relative > min_task_vector_distance and disagreement > min_disagreement,
        }
    diverged = all(pair["different"] for pair in pairs.values())
    report = {
        "models": per_model,
        "pairs": pairs,
        "diverged": diverged,
        "thresholds": {"min_task_vector_distance": min_task_vector_distance, "min_disagreement": min_disagreement},
        "validation_tokens": int(text_blocks.numel()),
    }
    if not diverged:
        same = [pair for pair, values in pairs.items() if not values["different"]]
        logger.warning("Phase 1 diversity check failed: %s did not diverge (see the diversity report).", same)
    return report


def write_diversity_report(report: dict, folder: Path) -> None:
    """`diversity_report.json` and `diversity.png` (halting, memory usage, accuracy, pairwise distances)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "diversity_report.json").write_text(json.dumps(report, indent=2))
    names = list(report["models"])
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    axes[0].bar(names, [report["models"][n]["avg_halt_step"] for n in names], color="tab:blue")
    axes[0].set_title("mean ACT halting step")
    axes[1].bar(names, [report["models"][n]["m_usage"] or 0.0 for n in names], color="tab:green")
    axes[1].set_title("memory share of the gate (m_usage)")
    pairs = list(report["pairs"])
    axes[2].bar(pairs, [report["pairs"][p]["next_token_disagreement"] for p in pairs], color="tab:red")
    axes[2].set_title("next-token disagreement")
    axes[2].tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(folder / "diversity.png")
    plt.close(figure)


__all__ = ["diversity_report", "write_diversity_report"]
