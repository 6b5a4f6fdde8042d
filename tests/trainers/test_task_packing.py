"""Task examples are packed with the token boundary generation sees: the prompt tokenized alone, then the target."""

from evaluation.tasks import get_task_family
from trainers.data import pack_examples


def test_a_code_example_trains_on_the_prompt_tokens_generation_sees():
    from modeling_forge.tokenization import build_tokenizer

    family = get_task_family("code")
    examples = family.generate("train", 200, seed=0, difficulty=1)
    tok = build_tokenizer([family.training_text(e) for e in examples], vocab_size=400)  # learns "\n    " merges
    example = examples[0]
    prompt_ids = tok(example.prompt)["input_ids"]
    whole = tok(example.prompt + example.target)["input_ids"]
    # The problem this guards against: BPE merges the prompt's final newline with the body's indentation, so the
    # whole text does not start with the prompt's own tokens.
    assert whole[: len(prompt_ids)] != prompt_ids

    ((ids, labels),) = pack_examples([(example.prompt, example.target)], tok, 256)
    assert ids[: len(prompt_ids)] == prompt_ids
    n = len(prompt_ids) + len(tok(example.target, add_special_tokens=False)["input_ids"]) + 1
    assert tok.decode(ids[len(prompt_ids) : n - 1]) == example.target and ids[n - 1] == tok.eos_token_id
    assert labels[:n] == ids[:n] and set(labels[n:]) <= {-100}
    # A plain string is still packed as one text.
    ((ids, _),) = pack_examples([example.prompt + example.target], tok, 256)
    assert ids[: len(whole)] == whole


def test_prompt_loss_false_labels_only_the_answers_of_task_examples(tiny_tokenizer):
    import pytest

    from trainers.data import CurriculumStage, build_curriculum

    tok = tiny_tokenizer
    examples = get_task_family("kv_recall").generate("train", 3, seed=0, difficulty=1)
    pairs = [(e.prompt, e.target) for e in examples]
    (full_ids, full_labels), *_ = pack_examples(pairs, tok, 512)
    (ids, labels), *_ = pack_examples(pairs, tok, 512, prompt_loss=False)
    assert ids == full_ids  # the same tokens, only the labels differ
    start, expected = 0, []
    for e in examples:
        n_prompt = len(tok(e.prompt)["input_ids"])
        answer = tok(e.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[start + n_prompt : start + n_prompt + len(answer)] == answer
        expected += [-100] * n_prompt + answer
        start += n_prompt + len(answer)
    assert labels == expected + [-100] * (512 - start)
    assert full_labels[:start] == full_ids[:start]  # the default still trains on the prompts

    # As a curriculum stage option: task blocks lose their prompt labels, corpus blocks keep every label.
    stage = CurriculumStage.from_dict(
        {"name": "s", "end": 1.0, "seq_len": 128, "mixture": {"corpus": 0.5, "kv_recall": 0.5}, "difficulty": [1, 1],
         "prompt_loss": False}
    )  # fmt: skip
    data = build_curriculum([stage], tok, max_steps=2, global_batch_size=4, seed=0)
    assert data.schedule[0]["prompt_loss"] is False
    for row in data.dataset:
        if row["source"] == "corpus":
            assert row["labels"] == row["input_ids"]
        else:  # a recall answer is 2 digits + EOS of a ~60-token example
            assert 0 < sum(lab != -100 for lab in row["labels"]) < 0.1 * len(row["labels"])
    with pytest.raises(ValueError, match="prompt_loss"):
        CurriculumStage.from_dict(
            {"name": "s", "end": 1.0, "seq_len": 64, "mixture": {"corpus": 1}, "prompt_loss": "no"}
        )
