"""The lm-eval adapter: local task YAMLs run offline on a tiny Forge folder agree with our harness; results land in
the folder's eval_results.json, metrics.json and card; the `recipes/eval.py` command line."""

import json

import pytest
import torch
import yaml

from evaluation.benchmarks import get_eval_task
from evaluation.harness import evaluate_folder, write_eval_results
from evaluation.lm_eval_adapter import export_lm_eval_tasks
from modeling_forge import ForgeConfig, ForgeForCausalLM


def _lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is the optional `eval` extra: pip install -e '.[eval]'")


ARC_ROWS = [
    ("Which gas do plants take in from the air?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
    ("What is the boiling point of water at sea level?", ["100 degrees", "50 degrees", "0 degrees", "10 C"], "A"),
    ("Which planet is closest to the Sun?", ["Mars", "Venus", "Earth", "Mercury"], "D"),
    ("What do bees make?", ["milk", "silk", "honey and wax", "wool"], "C"),
    ("Which of these is a mammal?", ["whale", "shark", "trout", "eel"], "A"),
    ("What force pulls objects toward the Earth?", ["magnetism", "gravity", "friction", "light"], "B"),
    ("What is frozen water called?", ["steam", "ice", "fog", "dew"], "B"),
    ("Which tool measures temperature?", ["ruler", "scale", "thermometer", "clock"], "C"),
]


@pytest.fixture
def forge_folder(tmp_path, tiny_tokenizer):
    """A finished phase folder (lineage, metrics.json, card) holding a tiny, untrained Forge model."""
    from trainers.phase_output import save_phase_output

    config = ForgeConfig.from_preset(
        "tiny",
        vocab_size=len(tiny_tokenizer),
        pad_token_id=tiny_tokenizer.pad_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        initializer_range=0.3,  # wide, so the choices' log-likelihoods differ clearly
    )
    torch.manual_seed(0)
    return save_phase_output(tmp_path / "model", model=ForgeForCausalLM(config), tokenizer=tiny_tokenizer, phase=1,
                             phase_name="cognate", config={"preset": "tiny"}, metrics={"eval/perplexity": 512.0},
                             seed=0, wall_time_s=1.0)  # fmt: skip


@pytest.fixture
def arc_file(tmp_path):
    rows = [
        {"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": k}
        for i, (q, c, k) in enumerate(ARC_ROWS)
    ]
    path = tmp_path / "arc_easy_test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_lm_eval_on_local_multiple_choice_task_equals_our_harness(forge_folder, arc_file):
    lm_eval = _lm_eval()
    data_files = {"arc-easy": arc_file}
    ours = evaluate_folder(forge_folder, ["arc-easy"], data_files=data_files, batch_size=3, log_samples=True)
    theirs = evaluate_folder(forge_folder, ["arc-easy"], backend="lm-eval", data_files=data_files, batch_size=5,
                             log_samples=True)  # fmt: skip
    ours, theirs = ours["arc-easy"], theirs["arc-easy"]
    assert theirs["backend"] == f"lm-eval {lm_eval.__version__}" and theirs["n"] == ours["n"] == len(ARC_ROWS)
    assert theirs["metrics"]["acc"] == ours["metrics"]["acc"]
    assert theirs["metrics"]["acc_norm"] == ours["metrics"]["acc_norm"]
    # Not only the accuracies: every choice's log-likelihood agrees (different batch sizes, same numbers).
    for mine, sample in zip(ours["samples"], theirs["samples"], strict=True):
        assert sample["target"] == mine["gold"]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
    # acc and acc_norm disagree on some question here, so the length normalisation was exercised.
    assert any(s["pred"] != s["pred_norm"] for s in ours["samples"])

    write_eval_results(forge_folder, {"arc-easy": ours})
    write_eval_results(forge_folder, {"arc-easy": theirs})
    metrics = json.loads((forge_folder / "metrics.json").read_text())
    entries = {(e["backend"], e["metric"]): e["value"] for e in metrics["eval_results"]}
    assert entries == {
        ("agent-forge", "acc"): ours["metrics"]["acc"],
        ("agent-forge", "acc_norm"): ours["metrics"]["acc_norm"],
        (theirs["backend"], "acc"): theirs["metrics"]["acc"],
        (theirs["backend"], "acc_norm"): theirs["metrics"]["acc_norm"],
    }
    assert metrics["metrics"] == {"eval/perplexity": 512.0}  # the phase's own metrics are kept
    card = (forge_folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    (index,) = front_matter["model-index"]
    reported = {(r["dataset"]["type"], m["type"], m["value"]) for r in index["results"] for m in r["metrics"]}
    assert ("allenai/ai2_arc", "acc_norm", ours["metrics"]["acc_norm"]) in reported
    assert json.loads((forge_folder / "eval_results.json").read_text())["results"]["arc-easy"]["n"] == len(ARC_ROWS)


def test_lm_eval_generation_task_equals_our_harness(forge_folder):
    _lm_eval()
    ours = evaluate_folder(forge_folder, ["kv_recall"], limit=4, batch_size=2, log_samples=True)["kv_recall"]
    theirs = evaluate_folder(forge_folder, ["kv_recall"], backend="lm-eval", limit=4, batch_size=4,
                             log_samples=True)["kv_recall"]  # fmt: skip
    assert theirs["n"] == ours["n"] == 4
    assert [s["resps"][0][0] for s in theirs["samples"]] == [s["completions"][0] for s in ours["samples"]]
    assert theirs["metrics"]["exact_match"] == ours["metrics"]["exact_match"]


def test_export_writes_offline_yaml_and_refuses_host_code_execution(tmp_path, arc_file):
    names = export_lm_eval_tasks(["arc-easy", "arithmetic"], tmp_path, limit=2, data_files={"arc-easy": arc_file})
    assert names == {"arc-easy": "forge_arc_easy", "arithmetic": "forge_arithmetic"}
    config = yaml.safe_load((tmp_path / "forge_arc_easy.yaml").read_text())
    assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
    docs = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"]["test"])]
    assert [d["gold"] for d in docs] == [1, 0] and docs[0]["choices"][1] == "carbon dioxide"
    assert "!function forge_lm_eval_utils.process_results" in (tmp_path / "forge_arithmetic.yaml").read_text()
    with pytest.raises(ValueError, match="sandbox"):
        export_lm_eval_tasks([get_eval_task("humaneval")], tmp_path)


def test_eval_recipe_prints_a_table_and_records_results(forge_folder, arc_file, tmp_path, capsys):
    from recipes.eval import main as eval_main
    from recipes.eval import make_parser

    report_path = tmp_path / "report.json"
    (args,) = make_parser().parse_args_into_dataclasses([
        "--model", str(forge_folder), "--tasks", "arc-easy,kv_recall", "--limit", "3", "--difficulty", "2",
        "--data_files", f"arc-easy={arc_file}", "--weights", "arc-easy=0.75,kv_recall=0.25",
        "--output_json", str(report_path),
    ])  # fmt: skip
    report = eval_main(args)
    printed = capsys.readouterr().out
    assert "| arc-easy | agent-forge | 3 | acc_norm * |" in printed and "Weighted composite" in printed
    results = report["results"]
    assert results["kv_recall"]["options"]["difficulty"] == 2
    expected = 0.75 * results["arc-easy"]["score"] + 0.25 * results["kv_recall"]["score"]
    assert report["composite"]["score"] == pytest.approx(expected)
    assert json.loads(report_path.read_text())["composite"]["score"] == pytest.approx(expected)
    tasks = {e["task"] for e in json.loads((forge_folder / "metrics.json").read_text())["eval_results"]}
    assert tasks == {"arc-easy", "kv_recall"}


def _phase_folder(tmp_path, tokenizer, phase: int):
    """A finished folder shaped like Phase `phase`'s output: Phase 3 adds the thought mixing head and Phase 2's merge
    scales (custom config fields the remote code must read), Phase 4 packs the backbone to 2-bit ternary weights."""
    from modeling_forge.bitnet import BitNetLayout, convert_to_bitnet, pack_bitnet
    from trainers.phase_output import save_phase_output

    extra = {"thought_mixing_hidden_size": 16, "layer_input_scales": [1.0, 0.8]} if phase == 3 else {}
    config = ForgeConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.3, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ForgeForCausalLM(config).eval()
    if phase == 4:
        convert_to_bitnet(model, BitNetLayout(embedding_bits=8, embedding_group_size=32))
        pack_bitnet(model)
    return save_phase_output(tmp_path / f"phase{phase}", model=model, tokenizer=tokenizer, phase=phase,
                             phase_name=f"phase{phase}", config={"preset": "tiny"}, seed=0)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("phase", [3, 4])
def test_lm_eval_command_line_scores_phase_folders_including_packed_ternary(tmp_path, tiny_tokenizer, arc_file, phase):
    """What a user types: `lm_eval --model hf --model_args pretrained=<folder>,trust_remote_code=True` on a local task
    YAML; its per-choice log-likelihoods equal our harness's on the same folder."""
    import subprocess
    import sys

    _lm_eval()
    folder = _phase_folder(tmp_path, tiny_tokenizer, phase)
    if phase == 4:
        assert json.loads((folder / "config.json").read_text())["bitnet"]["format"] == "packed"
    names = export_lm_eval_tasks(["arc-easy"], tmp_path / "tasks", data_files={"arc-easy": arc_file})
    out_dir = tmp_path / "lm_eval_out"
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
        "--tasks", names["arc-easy"], "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
        "--batch_size", "4", "--output_path", str(out_dir), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = out_dir.rglob("results_*.json")
    (samples_file,) = out_dir.rglob(f"samples_{names['arc-easy']}_*.jsonl")
    theirs = json.loads(results_file.read_text())["results"][names["arc-easy"]]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    ours = evaluate_folder(folder, ["arc-easy"], data_files={"arc-easy": arc_file}, log_samples=True)["arc-easy"]
    assert len(samples) == ours["n"] == len(ARC_ROWS)
    assert theirs["acc,none"] == ours["metrics"]["acc"]
    by_id = {s["doc_id"]: s for s in samples}
    for doc_id, mine in enumerate(ours["samples"]):
        got = [float(r[0][0]) for r in by_id[doc_id]["resps"]]  # the samples file stores strings
        assert got == pytest.approx(mine["loglikelihoods"], abs=1e-4)
