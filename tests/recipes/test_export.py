"""Phase 7 hand-off: the exported folder loads and generates in a Python that cannot import this package, with the
same greedy tokens; the card carries the size/latency table; the check fires on a folder without the model code."""

import json
import shutil

import pytest
import torch

from trainers.export import ExportConfig, check_without_package, export_model


def _save_tiny(folder, tokenizer, bitnet=False):
    from modeling_forge import ForgeConfig, ForgeForCausalLM
    from modeling_forge.bitnet import BitNetLayout, bitnet_candidates, convert_to_bitnet, pack_bitnet

    config = ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), trm_max_steps=1, memory_chunk_size=16,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = ForgeForCausalLM(config)
    if bitnet:
        convert_to_bitnet(model, BitNetLayout(modules=bitnet_candidates(model), embedding_bits=8))
        pack_bitnet(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bitnet", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fp32", "packed-ternary"])
def test_export_loads_and_generates_without_the_package(tmp_path, tiny_tokenizer, bitnet):
    source = _save_tiny(tmp_path / "final", tiny_tokenizer, bitnet=bitnet)
    out = tmp_path / "export"
    summary = export_model(ExportConfig(model=str(source), output_dir=str(out), check_tokens=6, speed_tokens=4,
                                        speed_repeats=1))  # fmt: skip
    report = json.loads((out / "export_report.json").read_text())
    assert report["check"]["tokens_equal"] and all(report["check"]["package_hidden"].values())
    assert report["check"]["model_class_module"].startswith("transformers_modules")  # the folder's own code
    assert report["exported_form"] == ("packed ternary" if bitnet else "fp32")
    rows = report["rows"]
    assert len(rows) == 2 and all(r["tokens_per_s"] > 0 and r["checkpoint_bytes"] > 0 for r in rows.values())
    assert report["size_ratio_fp32_over_packed"] > 1.5  # the packed form is several times smaller
    card = (out / "README.md").read_text()
    assert "## Size and CPU latency" in card and "hidden" in card
    assert json.loads((out / "forge_lineage.json").read_text())["phase"] == 7
    assert summary["output_dir"] == str(out)


def test_the_package_free_check_fails_on_a_folder_without_its_model_code(tmp_path, tiny_tokenizer):
    source = _save_tiny(tmp_path / "final", tiny_tokenizer)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "modeling_forge.py").unlink()
    with pytest.raises(RuntimeError, match="failed to load or generate without the agent-forge package"):
        check_without_package(broken, "def f(x):\n", 2)
