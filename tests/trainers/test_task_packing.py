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
