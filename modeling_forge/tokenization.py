"""Byte-level BPE tokenizer trained on a text iterator, with Agent Forge's special tokens.

Every checkpoint carries its tokenizer (saved with `save_pretrained`). Any Hub or local tokenizer works too when a
user names one; this builder exists so offline runs have a tokenizer fitted to the built-in corpus.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
# Phase 3 (Quiet-STaR) thought markers and strategy tokens, reserved in every tokenizer built here so all models
# of a pipeline share their ids (merges in Phase 2 need identical vocabularies).
THOUGHT_START = "<think>"
THOUGHT_END = "</think>"
STRATEGY_TOKENS = (
    "<decompose>",
    "<plan>",
    "<recall>",
    "<compute>",
    "<check>",
    "<compare>",
    "<backtrack>",
    "<analogy>",
    "<simplify>",
    "<conclude>",
)
THOUGHT_TOKENS = (THOUGHT_START, THOUGHT_END, *STRATEGY_TOKENS)
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *THOUGHT_TOKENS)
BYTE_ALPHABET_SIZE = 256


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    add_bos_token: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` entries (bytes + special tokens + merges) on `texts`.

    The tokenizer prepends `<|bos|>` to every encoded text (set `add_bos_token=False` to stop it); `<|eos|>` ends
    documents in training data and generation; `<|pad|>` pads. Decoding is lossless for any UTF-8 text.
    """
    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs {BYTE_ALPHABET_SIZE} byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens. Fix: use vocab_size >= {minimum} (e.g. 512 for tests)."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos_token:
        template = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
        )
        tokenizer.post_processor = processors.Sequence([byte_level, template])
    else:
        tokenizer.post_processor = byte_level
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(THOUGHT_TOKENS),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "STRATEGY_TOKENS", "THOUGHT_TOKENS", "build_tokenizer"]
