"""`benchmarks/depth_probe.py` (issue 14's depth evidence): its training blocks label exactly the answers, and its
batched scoring of right-padded held-out examples equals scoring each example alone."""

import importlib.util
from pathlib import Path

import pytest
import torch

from evaluation.corpus import corpus_texts
from evaluation.tasks.variable_chain import resolve
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer

_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def probe():
    import sys

    sys.path.insert(0, str(_DIR))  # the script imports its sibling `recursion.py`, as when run from the command line
    try:
        spec = importlib.util.spec_from_file_location("depth_probe_benchmark", _DIR / "depth_probe.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(_DIR))
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_texts("train", max_chars=60_000), vocab_size=512)


def test_training_blocks_label_only_the_answer_digit_and_its_end(probe, tokenizer):
    blocks = probe.train_blocks(tokenizer, range(1, 4), n_blocks=6, length=128, seed=0)
    assert len(blocks) == 6
    answers = 0
    for ids, labels in blocks:
        labelled = [i for i, label in enumerate(labels) if label != -100]
        assert labelled and all(labels[i] == ids[i] for i in labelled)
        for i in labelled:
            token = tokenizer.decode([ids[i]])
            if token.isdigit():  # the answer: the digit the example's own chain resolves to
                start = max([j + 1 for j in range(i) if ids[j] == tokenizer.eos_token_id], default=0)
                prompt = tokenizer.decode(ids[start:i], skip_special_tokens=True)
                assert resolve(prompt) == token.strip()
                answers += 1
            else:
                assert ids[i] == tokenizer.eos_token_id, token
    assert answers > 6, "whole examples, more than one per 128-token block"


def test_batched_scores_of_right_padded_examples_equal_each_example_alone(probe, tokenizer):
    torch.manual_seed(0)
    config = ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                     max_position_embeddings=128, trm_max_steps=2)  # fmt: skip
    model = ForgeForCausalLM(config).eval()
    with torch.no_grad():  # the refiner starts as the identity: give its steps an effect to check
        for module in model.model.recursion.refiner.modules():
            if getattr(module, "forge_init", None) == 0.0:
                module.weight.normal_(std=0.05)
    held_out = probe.held_out_examples(tokenizer, range(1, 3), n=5)
    ids, where = held_out[2]
    assert (where == ids.shape[1] - 1).all(), "one number of lookups: every example has the same length here"
    pad = torch.full((len(ids), 3), tokenizer.pad_token_id)
    held_out[2] = (torch.cat([ids, pad], dim=1), where)  # right padding, as a tokenizer with uneven lengths gives
    batched = probe.answer_scores(model, held_out, act_halting=True)
    for row in range(len(ids)):  # each example alone, unpadded, scored here by hand: its last token is the answer
        alone = ids[row : row + 1, : where[row] + 1]
        output = model(alone, act_halting=True)
        expected = torch.nn.functional.cross_entropy(output.logits[0, -2:-1].float(), alone[0, -1:])
        assert batched[2]["ce"][row] == pytest.approx(float(expected), abs=1e-4)
        assert batched[2]["steps"][row] == float(output.halt_steps[0, -2])
    # The same rows padded on the left instead move the answer's context: the scores change (the check can fail).
    shifted = torch.cat([torch.full((len(ids), 2), tokenizer.pad_token_id), ids], dim=1)
    moved = probe.answer_scores(model, {2: (shifted, where + 2)}, act_halting=True)[2]
    assert moved["ce"] != pytest.approx(batched[2]["ce"], abs=1e-4)
    assert probe.summary(batched)["all"]["acc"] == pytest.approx(
        sum(batched[1]["correct"] + batched[2]["correct"]) / 10
    )


def test_refiner_scale_reports_every_refiner_application_at_the_answers(monkeypatch, capsys):
    """`benchmarks/refiner_scale.py` (why the residual refiner switches off): one scale per application, 3 steps x 2
    micro-steps of attention and 3 x (2 + 1) of the shared SwiGLU; the features are normed (scale 1); an untrained
    refiner's zero-started outputs are still near 0 after two steps, and the TRM form's latent start is exactly 0."""
    import json
    import sys

    monkeypatch.syspath_prepend(str(_DIR))
    spec = importlib.util.spec_from_file_location("refiner_scale_benchmark", _DIR / "refiner_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reports = {}
    for norm in ("pre", "post"):
        monkeypatch.setattr(
            sys, "argv", ["refiner_scale.py", "--steps", "2", "--at", "2", "--set", f'trm_norm="{norm}"']
        )
        module.main()
        step, report = capsys.readouterr().out.strip().splitlines()[-1].split(" ", 1)
        assert step == "2"
        reports[norm] = json.loads(report)
    for report in reports.values():
        assert len(report["h"]) == 1 and abs(report["h"][0] - 1.0) < 0.05
        assert len(report["attention"]) == 6 and len(report["swiglu"]) == 9
        assert max(report["attention"] + report["swiglu"]) < 0.01
    assert reports["pre"]["z0"][0] > 0.05 and reports["post"]["z0"][0] < 0.01  # P_z h vs TRM's fixed start


def _levels(block, tokenizer) -> set[int]:
    """The numbers of lookups of the examples packed in one training block (whole examples, `<bos>...<eos>`)."""
    levels = set()
    for text in tokenizer.decode(block[0]).split(tokenizer.bos_token)[1:]:
        lines = text.split(tokenizer.eos_token)[0].split("\n")  # assignments, then the question and its answer
        assignments = dict(line.split("=") for line in lines[:-1])
        value, count = lines[-1].split("=")[0], 0
        while not value.isdigit():
            value, count = assignments[value], count + 1
        levels.add(count)
    return levels


def test_curriculum_adds_one_level_per_stage_in_order(probe, tokenizer):
    blocks = probe.curriculum_blocks(tokenizer, range(1, 4), n_blocks=9, length=128, seed=0, order_seed=0)
    assert len(blocks) == 9
    stages = [set().union(*[_levels(block, tokenizer) for block in blocks[i : i + 3]]) for i in (0, 3, 6)]
    assert stages == [{1}, {1, 2}, {1, 2, 3}]
    # The same check on the mixed blocks finds every level from the start (it can fail).
    mixed = probe.train_blocks(tokenizer, range(1, 4), n_blocks=3, length=128, seed=0)
    assert set().union(*[_levels(block, tokenizer) for block in mixed]) == {1, 2, 3}
