"""Prompt baking: the teacher sees the prompt with the adapters off, the student learns to behave so without it."""

import random

import pytest
import torch
from peft import PeftModel

from trainers import PromptBakingConfig, bake_prompt
from trainers.baking_trainer import (
    collate_baking,
    measure_kl,
    run_prompt_baking,
    sample_teacher_targets,
    text_targets,
    topk_kl,
)

CODES = ("9305", "1188", "4271", "6620")
FACT = "The secret code is 4271."
QUERY = "The secret code is"


@pytest.fixture(scope="module")
def fact_model(tiny_tokenizer):
    """A tiny Forge model that learnt to repeat a code stated earlier in its context (one of four codes), so its
    prompted behaviour differs from its unprompted one: with `FACT` in context it completes `QUERY` with 4271;
    without it, with any of the four codes."""
    from modeling_forge import ForgeConfig, ForgeForCausalLM

    tok = tiny_tokenizer
    config = ForgeConfig.from_preset(
        "tiny",
        vocab_size=len(tok),
        trm_max_steps=1,
        memory_chunk_size=16,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = ForgeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(120):
        texts = []
        for _ in range(32):
            code = rng.choice(CODES)
            texts.append(f"The secret code is {code}. The secret code is {code}.")
        ids = tok(texts, return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, torch.full((len(texts), 1), tok.eos_token_id)], dim=1)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _fresh(model):
    """A copy of the fixture model (baking works in place)."""
    from modeling_forge import ForgeForCausalLM

    copy = ForgeForCausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@torch.no_grad()
def _code_probability(model, tokenizer, context: str, code: str) -> float:
    """P(` code`) after `context`, the product of the per-token probabilities."""
    ids = tokenizer(context)["input_ids"]
    target = tokenizer(" " + code, add_special_tokens=False)["input_ids"]
    sequence = torch.tensor([ids + target])
    logprobs = torch.log_softmax(model(sequence).logits[0].float(), dim=-1)
    positions = range(len(ids) - 1, len(ids) + len(target) - 1)
    return float(torch.stack([logprobs[p, t] for p, t in zip(positions, target, strict=True)]).sum().exp())


def _config(**overrides):
    values = {
        "steps": 40,
        "batch_size": 16,
        "num_samples": 64,
        "eval_samples": 32,
        "max_new_tokens": 8,
        "top_k_logits": 0,
        "learning_rate": 3e-3,
        "lora_r": 16,
        "logging_steps": 20,
    }
    values.update(overrides)
    return PromptBakingConfig(**values)


def test_teacher_sees_the_prompt_with_adapters_off_and_student_starts_as_base(fact_model, tiny_tokenizer):
    """The earlier attempt's trap: teacher and student were one module with one context, so the KL was 0."""
    model = _fresh(fact_model)
    config = _config()
    targets = sample_teacher_targets(model, tiny_tokenizer, FACT, [QUERY], 16, config, seed=0)
    assert all(tiny_tokenizer.decode(e.input_ids[: e.target_start]) == "<|bos|>" + QUERY for e in targets)
    assert measure_kl(model, targets) > 0.3  # the prompt changes the teacher's predictions
    teacher_probability = _code_probability(model, tiny_tokenizer, f"{FACT} {QUERY}", "4271")
    assert teacher_probability > 0.8, teacher_probability


def test_baking_cuts_the_prompted_vs_unprompted_kl_by_80_percent(fact_model, tiny_tokenizer):
    model = _fresh(fact_model)
    result = run_prompt_baking(model, tiny_tokenizer, FACT, _config(), inputs=[QUERY])
    assert result.kl_initial > 0.3, result.kl_initial
    assert result.strength >= 0.8, (result.kl_initial, result.kl_final)
    assert result.rounds[0].kl_before == pytest.approx(result.kl_initial)
    assert any("bake/kl" in entry for entry in result.log_history)
    assert not isinstance(result.model, PeftModel)  # merged by default
    assert all(param.requires_grad for param in result.model.parameters())  # handed back trainable, as it came


def test_a_baked_fact_is_completed_without_the_prompt(fact_model, tiny_tokenizer):
    model = _fresh(fact_model)
    before = _code_probability(model, tiny_tokenizer, QUERY, "4271")
    assert before < 0.5, before  # unprompted, the model does not know which code
    baked = bake_prompt(model, tiny_tokenizer, FACT, _config(), inputs=[QUERY])
    after = _code_probability(baked, tiny_tokenizer, QUERY, "4271")
    assert after > 0.8, (before, after)
    prompt = tiny_tokenizer(QUERY, return_tensors="pt")
    generated = baked.generate(**prompt, max_new_tokens=6, do_sample=False)
    completion = tiny_tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert completion.strip().startswith("4271"), completion


def test_half_baking_lands_between_none_and_full_and_stacking_approaches_full(fact_model, tiny_tokenizer):
    """A full bake short enough not to saturate: the default targets also put adapters on the neural memory's and
    the TRM refiner's projections, so 8 of 16 steps at 3e-4 already reached 0.90 (full 0.94). Measured at 8 steps:
    half 0.55, full 0.90, two stacked halves 0.90."""
    strengths = {}
    for name, overrides in {"half": {"fraction": 0.5}, "full": {}, "half_x2": {"fraction": 0.5, "stack": 2}}.items():
        result = run_prompt_baking(
            _fresh(fact_model),
            tiny_tokenizer,
            FACT,
            _config(steps=8, learning_rate=3e-4, **overrides),
            inputs=[QUERY],
        )
        strengths[name] = result.strength
        if name == "half_x2":
            assert [r.steps for r in result.rounds] == [4, 4]
            assert result.nominal_strength == pytest.approx(0.75)
    assert 0.1 < strengths["half"] < strengths["full"] - 0.1, strengths
    assert strengths["half_x2"] > strengths["half"] + 0.05, strengths


def test_adapter_output_and_prompt_pursuit(fact_model, tiny_tokenizer):
    adapter = bake_prompt(_fresh(fact_model), tiny_tokenizer, FACT, _config(steps=10, output="adapter"), [QUERY])
    assert isinstance(adapter, PeftModel)
    with adapter.disable_adapter():  # the base is untouched under the adapter
        base_probability = _code_probability(adapter, tiny_tokenizer, QUERY, "4271")
    assert base_probability < 0.5
    pursued = run_prompt_baking(
        _fresh(fact_model), tiny_tokenizer, FACT, _config(steps=10, pursuit_rounds=1), inputs=[QUERY]
    )
    assert [r.kind for r in pursued.rounds] == ["bake", "pursuit"]
    assert pursued.rounds[1].kl_before < pursued.rounds[0].kl_before  # the re-baked teacher starts closer
    with pytest.raises(ValueError, match="output"):
        PromptBakingConfig(output="adapter", stack=2)


def test_topk_kl_is_exact_at_full_vocabulary_and_a_lower_bound_below():
    torch.manual_seed(0)
    teacher = torch.log_softmax(torch.randn(5, 40), dim=-1)
    student = torch.log_softmax(torch.randn(5, 40), dim=-1)
    exact = (teacher.exp() * (teacher - student)).sum(-1)
    full_ids = torch.arange(40).expand(5, -1)
    torch.testing.assert_close(topk_kl(student, full_ids, teacher), exact)
    values, ids = teacher.topk(8, dim=-1)
    bounded = topk_kl(student, ids, values)
    assert torch.all(bounded <= exact + 1e-6) and torch.all(bounded > 0)
    assert torch.allclose(topk_kl(teacher, ids, values), torch.zeros(5), atol=1e-5)  # 0 when student == teacher


def test_text_targets_make_the_kl_the_cross_entropy(tiny_tokenizer, tiny_config):
    from modeling_forge import ForgeForCausalLM

    torch.manual_seed(0)
    model = ForgeForCausalLM(tiny_config(vocab_size=len(tiny_tokenizer))).eval()
    examples = text_targets(tiny_tokenizer, [("Question: 2+3?", " 5")])
    batch = collate_baking(examples)
    with torch.no_grad():
        logits = model(batch["input_ids"], act_halting=False).logits[0]
    start = examples[0].target_start
    targets = batch["input_ids"][0, start:]
    ce = torch.nn.functional.cross_entropy(logits[start - 1 : -1], targets)
    assert measure_kl(model, examples) == pytest.approx(float(ce), rel=1e-5)
