"""Phase 6: the A/B loop alternates, keeps only bakes whose paired gain clears the bar, stops on a plateau, writes its
history; the paired bootstrap and the degeneracy checks fire on bad cases and stay silent on good ones."""

import json

import numpy as np
import pytest
import torch

from trainers.persona_config import PersonaConfig
from trainers.persona_trainer import (
    HISTORY_FILE,
    degeneracy_reasons,
    keep_decision,
    paired_bootstrap,
    run_phase6,
)

N_ITEMS = 30


class ScriptedScorer:
    """Scores that depend only on which prompts are baked (or in context): the good tool prompt lifts A from 30% to
    80% of items, the careful persona lifts B from 40% to 70%; every other prompt changes nothing."""

    def __init__(self):
        self.calls = []

    def weights(self, kind):
        return np.ones(N_ITEMS)

    def score(self, kind, model, tokenizer, prefix="", baked=()):
        self.calls.append((kind, prefix, tuple(baked)))
        if kind == "A":
            share = 0.8 if any("GOOD_TOOL" in b for b in baked) else 0.3
        else:
            share = 0.7 if "careful" in prefix or any("careful" in b for b in baked) else 0.4
        return (np.arange(N_ITEMS) < round(share * N_ITEMS)).astype(float)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer):
    from modeling_forge import ForgeConfig, ForgeForCausalLM

    tok = tiny_tokenizer
    config = ForgeConfig.from_preset("tiny", vocab_size=len(tok), trm_max_steps=1, memory_chunk_size=16,
                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("phase5")
    ForgeForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _config(src, out, **overrides):
    values = dict(
        model_name_or_path=str(src), output_dir=str(out), tool_prompts=["a plain tool prompt", "GOOD_TOOL: test it"],
        persona_templates=["I am careful and precise with every answer I give.", "I am quick and I guess answers."],
        num_self_descriptions=2, self_description_max_new_tokens=6, max_self_perplexity=1.0, patience=1,
        max_cycles=8, bootstrap_samples=500, min_gain=0.05,
        bake={"steps": 4, "num_samples": 8, "eval_samples": 4, "batch_size": 4, "max_new_tokens": 4},
    )  # fmt: skip
    values.update(overrides)
    return PersonaConfig(**values)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_phase6_alternates_keeps_winners_stops_on_plateau_and_writes_history(tiny_folder, tmp_path):
    out = tmp_path / "phase6"
    scorer = ScriptedScorer()
    summary = run_phase6(_config(tiny_folder, out), scorer=scorer)
    h = summary["history"]
    assert [c["kind"] for c in h["cycles"]] == ["A", "B", "A", "B"]
    assert [c["kept"] for c in h["cycles"]] == [True, True, False, False]
    assert h["stopped"] == "plateau"
    assert h["cycles"][0]["winner"] == "GOOD_TOOL: test it"
    assert h["cycles"][0]["gain"] == pytest.approx(0.5)
    assert h["cycles"][0]["ci_low"] > 0
    # B: the untrained model's self-descriptions are degenerate, so both templates stand in; the careful one wins.
    b = h["cycles"][1]
    assert {c["source"] for c in b["candidates"]} == {"template"}
    assert all(c["degenerate"] for c in b["candidates"])
    assert b["winner"].startswith("I am careful")
    assert b["gain"] == pytest.approx(0.3)
    assert h["input_scores"] == {"A": pytest.approx(0.3), "B": pytest.approx(0.4)}
    assert h["final_scores"] == {"A": pytest.approx(0.8), "B": pytest.approx(0.7)}
    # The ledger: two kept half-bakes, each its prompt's first (nominal 0.5), with a measured KL strength.
    assert [b["prompt"] for b in h["baked"]] == ["GOOD_TOOL: test it", b["winner"]]
    assert all(entry["cumulative_nominal_strength"] == pytest.approx(0.5) for entry in h["baked"])
    assert all(np.isfinite(entry["strength"]) for entry in h["baked"])
    # Written: history, plots, card; the winner was baked in (weights changed), and the folder loads.
    on_disk = json.loads((out / HISTORY_FILE).read_text())
    assert on_disk["cycles"][0]["winner"] == "GOOD_TOOL: test it"
    assert (out / "plots" / "ab_gains.png").exists() and (out / "plots" / "ab_scores.png").exists()
    assert "A/B history" in (out / "README.md").read_text()
    before, after = _weights(tiny_folder), _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before if "proj" in k)
    assert not (out.parent / ".phase6-work").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_phase6_keeps_nothing_when_no_candidate_beats_the_bar(tiny_folder, tmp_path):
    out = tmp_path / "phase6"
    summary = run_phase6(_config(tiny_folder, out, tool_prompts=["a plain tool prompt"],
                                 persona_templates=["I am quick and I guess answers.", "I am a model of words."]),
                         scorer=ScriptedScorer())  # fmt: skip
    h = summary["history"]
    assert [c["kept"] for c in h["cycles"]] == [False, False]
    assert h["stopped"] == "plateau" and h["baked"] == []
    before, after = _weights(tiny_folder), _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_phase6_resumes_after_the_last_finished_cycle(tiny_folder, tmp_path):
    out = tmp_path / "phase6"

    class Interrupt(RuntimeError):
        pass

    class CutAfterTwoCycles(ScriptedScorer):
        def score(self, kind, model, tokenizer, prefix="", baked=()):
            if len([c for c in self.calls if c[0] == "A"]) >= 5 and kind == "A":  # during cycle 2
                raise Interrupt
            return super().score(kind, model, tokenizer, prefix, baked)

    with pytest.raises(Interrupt):
        run_phase6(_config(tiny_folder, out), scorer=CutAfterTwoCycles())
    state = json.loads((tmp_path / ".phase6-work" / "state.json").read_text())
    assert len(state["cycles"]) == 2 and (tmp_path / ".phase6-work" / "model").exists()
    assert not out.exists()
    scorer = ScriptedScorer()
    h = run_phase6(_config(tiny_folder, out, resume=True), scorer=scorer)["history"]
    assert [c["kept"] for c in h["cycles"]] == [True, True, False, False]
    assert h["input_scores"]["A"] == pytest.approx(0.3)


def test_paired_bootstrap_separates_a_real_gain_from_noise():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 200).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:40]] = 1.0  # 40 of 200 items flip to right: +0.2
    stats = paired_bootstrap(base, better, seed=0)
    assert stats["gain"] == pytest.approx(0.2) and stats["ci_low"] > 0.1
    assert keep_decision(stats, min_gain=0.05)
    noisy = base.copy()
    flip = rng.choice(200, 20, replace=False)
    noisy[flip] = 1.0 - noisy[flip]  # as many flips each way on average: no real gain
    stats = paired_bootstrap(base, noisy, seed=0)
    assert stats["ci_low"] < 0 < stats["ci_high"]
    assert not keep_decision(stats, min_gain=0.0)
    # A real but tiny gain is not kept under a minimum gain above it.
    assert not keep_decision({"gain": 0.01, "ci_low": 0.001, "ci_high": 0.02}, min_gain=0.02)


def test_degeneracy_checks_fire_on_bad_descriptions_and_pass_a_good_one(tmp_path):
    config = PersonaConfig(model_name_or_path="x", output_dir=str(tmp_path / "o"))
    good = "I am a careful assistant who checks each step and answers briefly."
    assert degeneracy_reasons(good, [], 20.0, config) == []
    assert "words" in degeneracy_reasons("I am", [], 20.0, config)[0]
    assert "distinct" in degeneracy_reasons("the the the the the the the the", [], 20.0, config)[0]
    assert "overlap" in degeneracy_reasons(good, [good], 20.0, config)[0]
    assert "perplexity" in degeneracy_reasons(good, [], 5000.0, config)[0]
    # Garbage with enough distinct "words" (what an untrained model writes) is caught by the known-word share.
    garbage = "I am w, youe foron A TheSA PBKING zorp."
    assert any("known words" in r for r in degeneracy_reasons(garbage, [], 20.0, config))


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="PersonaConfig.suite"):
        PersonaConfig(model_name_or_path="x", output_dir=str(tmp_path), suite={"arithmetic": -1})
    with pytest.raises(ValueError, match="PersonaConfig.bake"):
        PersonaConfig(model_name_or_path="x", output_dir=str(tmp_path), bake={"fraction": 2.0})
    with pytest.raises(ValueError, match="PersonaConfig.first_cycle"):
        PersonaConfig(model_name_or_path="x", output_dir=str(tmp_path), first_cycle="C")


def test_task_scorer_scores_each_fixed_item_and_passes_the_persona_prefix(monkeypatch, tmp_path):
    """The real scorer's plumbing: reference answers score 1 on every item (code runs in the sandbox), garbage 0, the
    prefix reaches every prompt, and the items are validation-split (never the test split the report uses)."""
    import trainers.persona_trainer as persona
    from trainers.persona_trainer import TaskScorer

    config = PersonaConfig(model_name_or_path="x", output_dir=str(tmp_path / "o"), code_examples=3,
                           suite={"kv_recall": 1.0, "code": 1.0}, suite_examples=2)  # fmt: skip
    scorer = TaskScorer(config)
    assert len(scorer.items["A"]) == 3 and len(scorer.items["B"]) == 4
    assert all(item.doc.meta["example"].meta["split"] == "validation" for k in "AB" for item in scorer.items[k])
    assert scorer.weights("B").sum() == pytest.approx(1.0)
    targets = {item.doc.prompt: item.doc.meta["example"].target for k in "AB" for item in scorer.items[k]}
    seen = []

    def right(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return [[targets[p.removeprefix("PERSONA ")]] for p in prompts]

    monkeypatch.setattr(persona, "generate_completions", right)
    assert scorer.score("A", None, None).tolist() == [1.0] * 3
    assert scorer.score("B", None, None, prefix="PERSONA ").tolist() == [1.0] * 4
    assert all(p.startswith("PERSONA ") for p in seen[3:])
    monkeypatch.setattr(
        persona, "generate_completions", lambda m, t, prompts, **k: [["    return None\n"]] * len(prompts)
    )
    assert scorer.score("A", None, None).tolist() == [0.0] * 3
    assert scorer.score("B", None, None).tolist() == [0.0] * 4
    assert len(scorer.bake_inputs("A", 4)) == 4
