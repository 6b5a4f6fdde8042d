"""The `make demo` job end to end: trains, saves atomically, reloads with the Auto classes, measures perplexity."""

import json
import math

import pytest
from transformers import AutoModelForCausalLM

from trainers.quickstart import QuickstartConfig, run_quickstart


@pytest.mark.slow
def test_quickstart_demo_budget(corpus_ready, tmp_path):
    result = run_quickstart(QuickstartConfig(output_dir=str(tmp_path / "demo")))
    folder = tmp_path / "demo"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_forge.py", "README.md"} <= names
    assert {"forge_lineage.json", "metrics.json"} <= names and (folder / "plots" / "loss_per_trm_step.png").exists()
    assert result["round_trip_exact"]  # the reloaded folder gives bit-identical logits
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "forge"
    assert result["train_loss_last_window"] < result["train_loss_first_window"] - 1.5
    # far better than the uniform 1024-way guess, and measured (not a constant): it is exp of the logged NLL
    assert 20 < result["validation_perplexity"] < 200
    steps = result["train_step_losses_last_window"]
    # Every TRM step's loss is logged and finite. Whether later steps beat step 0 is measured in
    # benchmarks/recursion.py, not asserted here: on this budget the steps differ by < 1e-3 nats (issue 14 is open).
    assert len(steps) == AutoModelForCausalLM.from_pretrained(folder).config.trm_max_steps + 1, steps
    assert all(math.isfinite(v) for v in steps), steps
    saved = json.loads((folder / "quickstart_results.json").read_text())
    assert saved["validation_perplexity"] == result["validation_perplexity"]
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    assert metrics["eval/perplexity"] == result["validation_perplexity"]
    assert f"{result['validation_perplexity']:.6g}" in (folder / "README.md").read_text()
    assert result["sample"].startswith("ROMEO.") and len(result["sample"]) > 40


def test_quickstart_config_rejects_bad_values():
    with pytest.raises(ValueError, match="QuickstartConfig.max_steps"):
        QuickstartConfig(max_steps=0)
    with pytest.raises(ValueError, match="block_size"):
        QuickstartConfig(block_size=4096)
