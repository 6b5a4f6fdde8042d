"""Training data: tokenising texts and packing them into fixed-length blocks for causal LM training."""

from collections.abc import Iterable

from datasets import Dataset
from transformers import PreTrainedTokenizerBase


def pack_texts(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, block_size: int, *, drop_last: bool = True
) -> Dataset:
    """Tokenise `texts` (each ends with EOS), concatenate them and cut the stream into `block_size` blocks.

    Returns a `datasets.Dataset` with `input_ids` and `labels` (equal: the model shifts labels internally).
    Blocks cross document boundaries, as in GPT-style pretraining; the EOS token marks each boundary.
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2 to have a next-token target. Fix: use e.g. 256.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token. Fix: set tokenizer.eos_token before packing.")
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // block_size if drop_last else -(-len(stream) // block_size)
    if n_blocks == 0:
        raise ValueError(
            f"The texts give {len(stream)} tokens, fewer than one block of {block_size}. Fix: pass more text or "
            "lower block_size."
        )
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})


__all__ = ["pack_texts"]
