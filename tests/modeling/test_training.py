"""Training through the stock Trainer, loss accounting, gradient checkpointing and PEFT LoRA."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from modeling_forge import ForgeForCausalLM
from trainers.base import ForgeTrainer
from trainers.data import pack_texts

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(config, seed=0):
    torch.manual_seed(seed)
    return ForgeForCausalLM(config)


def _dataset(tokenizer, n_chars=40_000, block=64):
    from evaluation.corpus import corpus_texts

    return pack_texts(corpus_texts("train", max_chars=n_chars), tokenizer, block)


def _args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "max_steps": 30,
        "logging_steps": 10,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def test_stock_trainer_lowers_loss_and_changes_every_weight(tiny_tokenizer, tiny_config, tmp_path):
    model = _model(tiny_config(vocab_size=len(tiny_tokenizer)))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = _dataset(tiny_tokenizer)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=dataset, data_collator=default_data_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.5, losses
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    assert not unchanged, unchanged


def test_forge_trainer_logs_loss_parts_and_per_step_losses(tiny_tokenizer, tiny_config, tmp_path):
    model = _model(tiny_config(vocab_size=len(tiny_tokenizer)))
    dataset = _dataset(tiny_tokenizer)
    trainer = ForgeTrainer(
        model=model,
        args=_args(tmp_path, max_steps=10, logging_steps=5, eval_strategy="steps", eval_steps=10),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(8)),
        data_collator=default_data_collator,
    )
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    eval_logs = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    expected = {"loss/lm", "loss/act", "gate/entropy", "act/avg_steps", "act/halt_prob_step0", "gate/m_usage"}
    expected |= {f"loss/step_{t}" for t in range(4)} | {f"act/acc_step{t}" for t in range(4)}
    assert expected <= set(train_logs[-1]), set(train_logs[-1])
    assert {f"eval_{name}" for name in expected} <= set(eval_logs[-1])
    assert 0.0 <= train_logs[-1]["act/avg_steps"] <= 3.0
    assert 0.0 < train_logs[-1]["gate/entropy"] <= 0.6932


def test_loss_terms_accumulate_exactly_with_num_items_in_batch(tiny_config):
    """Two half-batches with Trainer's `num_items_in_batch` sum to the full batch's loss (what DDP/accumulation
    rely on); without it, each half is a mean over its own tokens."""
    model = _model(tiny_config()).train()
    x = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[0, :5] = -100
    n_items = (labels[:, 1:] != -100).sum()
    full = model(x, labels=labels)
    halves = [model(x[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=n_items) for i in (0, 2)]
    torch.testing.assert_close(halves[0].lm_loss + halves[1].lm_loss, full.lm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(halves[0].act_loss + halves[1].act_loss, full.act_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x, labels=labels, num_items_in_batch=n_items).loss, full.loss)
    # the loss really is the weighted deep-supervision objective
    weights = torch.tensor(model.config.trm_step_weights)
    torch.testing.assert_close(full.lm_loss, (weights * full.step_losses).sum() / weights.sum())


def test_labels_are_shifted_inside_the_model(tiny_config):
    model = _model(tiny_config()).eval()
    x = torch.randint(0, 97, (2, 16))
    out = model(x, labels=x, act_halting=False, output_step_logits=True)
    logits = out.step_logits[-1][:, :-1]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.step_losses[-1], manual)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    x = torch.randint(0, 97, (2, 24))
    grads = []
    for checkpointing in (False, True):
        model = _model(tiny_config()).train()
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5 name of gradient_checkpointing_enable
            assert model.is_activation_checkpointing
        model(x, labels=x).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_peft_lora_trains_and_merges(tiny_tokenizer, tiny_config, tmp_path):
    model = _model(tiny_config(vocab_size=len(tiny_tokenizer)))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("self_attn.q_proj" in n for n in trainable) and any("mlp.down_proj" in n for n in trainable)
    dataset = _dataset(tiny_tokenizer)
    probe = torch.tensor(dataset[:8]["input_ids"])
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}

    def probe_loss():
        peft_model.eval()
        with torch.no_grad():
            return float(peft_model(input_ids=probe, labels=probe).loss)

    before = probe_loss()
    args = _args(tmp_path, max_steps=20)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    trainer.train()
    after = probe_loss()
    # The adapters alone learned (measured 6.203 -> 6.108 nats on these training blocks, deterministic; without
    # training the two are equal); the base stayed frozen.
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if not p.requires_grad)
    peft_model.eval()
    x = torch.tensor(dataset[0]["input_ids"])[None]
    with torch.no_grad():
        adapted = peft_model(input_ids=x).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, adapted, rtol=1e-4, atol=1e-4)


def test_deep_supervision_fraction_is_an_unbiased_estimate(tiny_config):
    """Sampling label positions for the intermediate steps keeps the per-step losses' expectation (the diagnostics,
    and the objective with `deep_supervision_rescale`) and the final step exact."""
    x = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    exact = _model(tiny_config()).train()
    sampled = _model(tiny_config(deep_supervision_fraction=0.25, deep_supervision_rescale=True)).train()
    with torch.no_grad():
        reference = exact(x, labels=x)
        draws = [sampled(x, labels=x) for _ in range(300)]
    mean_steps = torch.stack([d.step_losses for d in draws]).mean(0)
    torch.testing.assert_close(mean_steps, reference.step_losses, rtol=0.01, atol=0.0)
    assert all(torch.equal(d.step_losses[-1], reference.step_losses[-1]) for d in draws[:5])
    spread = torch.stack([d.step_losses[0] for d in draws]).std()
    assert spread > 0  # it really is sampled
    sampled.eval()  # evaluation always scores every position
    with torch.no_grad():
        torch.testing.assert_close(sampled(x, labels=x).step_losses, exact.eval()(x, labels=x).step_losses)


@pytest.mark.parametrize("rescale", [True, False])
def test_deep_supervision_rescale_weights_the_sampled_steps(tiny_config, rescale):
    """Rescaled, the sampled intermediate terms enter the objective at full weight (unbiased); not rescaled, at the
    sampled fraction of it (each step weighted by the fraction). The per-step diagnostics are rescaled either way."""
    x = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    model = _model(tiny_config(deep_supervision_fraction=0.25, deep_supervision_rescale=rescale)).train()
    weights = torch.tensor(model.config.trm_step_weights)
    with torch.no_grad():
        out = model(x, labels=x)
    fraction = round(0.25 * 124) / 124  # 4 x 31 label positions, 31 of them sampled
    steps = out.step_losses
    unbiased = (weights * steps).sum() / weights.sum()
    shrunk = steps.clone()
    shrunk[:-1] *= fraction
    down_weighted = (weights * shrunk).sum() / weights.sum()
    assert (unbiased - down_weighted).abs() > 1e-3  # the two objectives differ on this batch
    torch.testing.assert_close(out.lm_loss, unbiased if rescale else down_weighted)


def test_step_accuracies_match_argmax_over_real_tokens(tiny_config):
    """The top-1 shortcut (`amax`, not `argmax`) reports each step's accuracy over label positions only."""
    torch.manual_seed(0)
    model = _model(tiny_config()).eval()
    with torch.no_grad():  # a sharper head, so some predictions are right
        model.lm_head.weight.mul_(20.0)
    x = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(2))
    labels = x.clone()
    labels[0, :10] = -100  # prompt positions: not scored
    with torch.no_grad():
        out = model(x, labels=labels, output_step_logits=True)
    targets = labels[:, 1:]
    mask = targets != -100
    expected = [((logits[:, :-1].argmax(-1) == targets) & mask).sum() / mask.sum() for logits in out.step_logits]
    torch.testing.assert_close(out.step_accuracies, torch.stack(expected).float())
    assert out.step_accuracies.max() > 0  # the check compares real hits, not all-zero vectors
    wrong = [(logits[:, :-1].argmax(-1) == targets).float().mean() for logits in out.step_logits]
    assert not torch.allclose(torch.stack(wrong), out.step_accuracies)  # padding would change the figure
