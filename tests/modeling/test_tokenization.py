"""The byte-level BPE builder: special tokens, lossless round trips, stable ids through save/load."""

import pytest
from transformers import AutoTokenizer

from modeling_forge.tokenization import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, THOUGHT_TOKENS, build_tokenizer

TEXTS = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"] * 50


def test_special_and_thought_tokens_are_single_reserved_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == 512
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    ids = [tok.convert_tokens_to_ids(t) for t in THOUGHT_TOKENS]
    assert len(THOUGHT_TOKENS) == 12 and len(set(ids)) == 12 and all(i < 20 for i in ids)  # same ids in every build
    encoded = tok("a <think> b </think> c", add_special_tokens=False).input_ids
    assert ids[0] in encoded and ids[1] in encoded  # never split into pieces


def test_round_trip_is_lossless_and_bos_is_prepended(tiny_tokenizer):
    text = "Thou art more lovely — and more temperate: naïve café ✓ 42\n\ttabs"
    ids = tiny_tokenizer(text).input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_save_and_load_keep_ids(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = "Now is the winter of our discontent <plan> made glorious summer"
    assert reloaded(sample).input_ids == tiny_tokenizer(sample).input_ids
    assert reloaded.convert_tokens_to_ids(list(THOUGHT_TOKENS)) == tiny_tokenizer.convert_tokens_to_ids(
        list(THOUGHT_TOKENS)
    )


def test_builder_learns_merges_and_rejects_tiny_vocab():
    tok = build_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    assert len(tok("To be, or not to be").input_ids) < len("To be, or not to be")  # merges were learnt
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*Fix"):
        build_tokenizer(TEXTS, vocab_size=100)
