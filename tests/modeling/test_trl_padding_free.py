"""TRL's SFTTrainer with `padding_free=True` (documents concatenated into one row, `position_ids` restarting at each
document) trains a Forge model, and a packed row computes what the documents computed one by one."""

import pytest
import torch
from datasets import Dataset

from modeling_forge import ForgeForCausalLM

DOCS = [
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players.",
]


ONLY_THE_MODEL_LOSS_TRAINS = {
    "model.recursion.act_head.weight",
    "model.recursion.act_head.bias",
    "model.recursion.refiner.z_init.weight",
}


def _model(config_factory, tokenizer, **overrides) -> ForgeForCausalLM:
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
               "bos_token_id": tokenizer.bos_token_id}  # fmt: skip
    config = config_factory(vocab_size=len(tokenizer), initializer_range=0.1, **special, **overrides)
    torch.manual_seed(0)
    return ForgeForCausalLM(config)


@pytest.mark.parametrize("detach", [None, False])
def test_sft_trainer_padding_free_trains_every_parameter(tiny_config, tiny_tokenizer, tmp_path, detach):
    """TRL 1.16's SFTTrainer takes its own loss: cross-entropy of `lm_head(base_model(...).last_hidden_state)`, the
    final recursion step, not the model's deep-supervised loss. So that one step's gradient must reach every
    parameter but two that only the model's own loss trains: the ACT head (its halting loss) and, under TRM's carry
    detach, the initial-latent projection `z_init` (the first step's loss)."""
    from trl import SFTConfig, SFTTrainer

    model = _model(tiny_config, tiny_tokenizer, sliding_window=16, trm_detach_between_steps=detach)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path), padding_free=True, per_device_train_batch_size=3, max_steps=3,
                     learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     dataset_text_field="text", max_length=None)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": DOCS * 4}),
                         processing_class=tiny_tokenizer)  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    frozen = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and torch.equal(p, before[name]) and name not in ONLY_THE_MODEL_LOSS_TRAINS
    ]
    assert not frozen, f"not trained under padding-free batches: {frozen}"


@pytest.mark.parametrize("memory_type", ["none", "preset"])
def test_padding_free_row_equals_the_documents_one_by_one(tiny_config, tiny_tokenizer, memory_type):
    """TRL's collator, padding-free vs padded, on the same documents: same loss and same logits at every real token.
    This needs the attention to stop at document starts and the memory to reset there."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    overrides = {"sliding_window": 64} | ({"memory_type": "none"} if memory_type == "none" else {})
    model = _model(tiny_config, tiny_tokenizer, **overrides).eval()
    examples = [{"input_ids": tiny_tokenizer(doc)["input_ids"]} for doc in DOCS]
    lengths = [len(e["input_ids"]) for e in examples]
    pad_id = tiny_tokenizer.pad_token_id
    packed = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_id)(examples)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    with torch.no_grad():
        one_row = model(**packed, act_halting=False, use_cache=False)  # as in training: a cache turns packing off
        batch = model(**padded, act_halting=False, use_cache=False)
    torch.testing.assert_close(one_row.lm_loss, batch.lm_loss, rtol=1e-5, atol=1e-5)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for row, (start, end) in enumerate(zip(starts, starts[1:], strict=False)):
        torch.testing.assert_close(one_row.logits[0, start:end], batch.logits[row, : end - start], rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
