"""Phase outputs: complete folders, lineage chains with content hashes, cards built only from the run's files."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hub_cards import available_templates, render_card
from modeling_forge import ForgeForCausalLM
from trainers.phase_output import save_phase_output, weights_sha256


def _save(tmp_path, name, tiny_config, **kwargs):
    torch.manual_seed(len(name))
    model = ForgeForCausalLM(tiny_config())
    defaults = {"phase": 1, "phase_name": "cognate", "config": {"lr": 1e-3}, "seed": 3, "wall_time_s": 1.5}
    defaults.update(kwargs)
    return model, save_phase_output(tmp_path / name, model=model, tokenizer=None, **defaults)


def test_phase_output_is_complete_and_reloads(tiny_config, tmp_path):
    model, folder = _save(
        tmp_path,
        "p1",
        tiny_config,
        metrics={"eval/perplexity": 41.25, "act/avg_steps": 2.5},
        eval_results=[
            {"dataset": "agent-forge/shakespeare", "split": "validation", "metric": "perplexity", "value": 41.25}
        ],  # fmt: skip
        write_extras=lambda f: (f / "report.json").write_text("{}"),
    )
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "forge_lineage.json",
        "metrics.json",
        "README.md",
        "report.json",
    } <= names
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(folder).eval()(x).logits, model.eval()(x).logits
        )
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "phase-1" in card.data.tags
    assert card.data.eval_results[0].metric_value == 41.25
    assert "| `eval/perplexity` | 41.25 |" in card.text and "| `act/avg_steps` | 2.5 |" in card.text
    assert '"lr": 0.001' in card.text  # the exact config is embedded


def test_card_numbers_come_only_from_the_folder(tiny_config, tmp_path):
    _, folder = _save(tmp_path, "p1", tiny_config, metrics={"eval/perplexity": 41.25})
    payload = json.loads((folder / "metrics.json").read_text())
    payload["metrics"]["eval/perplexity"] = 12.5  # the card follows the file, not the run's Python objects
    (folder / "metrics.json").write_text(json.dumps(payload))
    text = render_card(folder).text
    assert "| `eval/perplexity` | 12.5 |" in text and "41.25" not in text


def test_lineage_chains_back_with_content_hashes(tiny_config, tmp_path):
    _, first = _save(tmp_path, "p1", tiny_config)
    _, second = _save(tmp_path, "p2", tiny_config, phase=2, phase_name="evomerge", inputs=[first, "org/hub-model"])
    lineage = json.loads((second / "forge_lineage.json").read_text())
    assert [item["id"] for item in lineage["inputs"]] == [str(first), "org/hub-model"]
    assert lineage["inputs"][0]["sha256"] == weights_sha256(first) and lineage["inputs"][1]["sha256"] is None
    assert lineage["parents"][0]["phase"] == 1 and lineage["parents"][0]["seed"] == 3
    assert {"torch", "transformers"} <= set(lineage["library_versions"])
    card = ModelCard.load(second / "README.md")
    assert card.data.base_model == ["org/hub-model"]  # a local path is never a base_model (the Hub rejects it)
    assert lineage["inputs"][0]["hub_id"] is None and lineage["inputs"][1]["hub_id"] == "org/hub-model"
    assert "phase 1 (cognate)" in card.text


def test_bad_inputs_give_clear_errors(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="forge_lineage.json"):
        render_card(tmp_path)
    _, folder = _save(tmp_path, "p1", tiny_config)
    with pytest.raises(ValueError, match="Unknown card template 'phase99'"):
        render_card(folder, "phase99")
    with pytest.raises(FileExistsError):
        _save(tmp_path, "p1", tiny_config)
    assert "phase" in available_templates() and "quickstart" in available_templates()
