"""Perplexity of a causal LM on texts, with a rolling (strided) window so every token has context."""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over the concatenated texts (each followed by EOS).

    Windows of `max_length` tokens advance by `stride`; each window scores only the tokens no earlier window
    scored, so with `stride < max_length` every scored token sees at least `max_length - stride` tokens of
    context (the "rolling" evaluation of the transformers docs). The model runs in eval mode, so ACT-halted
    logits are the ones evaluated.
    """
    max_length = max_length or getattr(model.config, "max_position_embeddings", 1024)
    stride = stride or max_length
    if not 0 < stride <= max_length:
        raise ValueError(f"stride={stride} must satisfy 0 < stride <= max_length={max_length}.")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, verbose=False)["input_ids"])  # windows are cut below; no length warning
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    if len(ids) < 2:
        raise ValueError("Perplexity needs at least two tokens of text.")
    stream = torch.tensor(ids, device=model.device)
    was_training = model.training
    model.eval()
    total_nll, total_tokens, scored_until = 0.0, 0, 1  # token 0 has no prediction
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + max_length, len(ids))
        window = stream[begin:end][None]
        logits = model(input_ids=window).logits[0, :-1].float()  # predicts tokens begin+1 .. end-1
        targets = window[0, 1:]
        first_new = max(scored_until, begin + 1) - (begin + 1)
        nll = F.cross_entropy(logits[first_new:], targets[first_new:], reduction="sum")
        total_nll += float(nll)
        total_tokens += int(targets.shape[0] - first_new)
        scored_until = end
        if end == len(ids):
            break
    model.train(was_training)
    mean_nll = total_nll / total_tokens
    return PerplexityResult(perplexity=float(torch.exp(torch.tensor(mean_nll))), nll=mean_nll, n_tokens=total_tokens)


__all__ = ["PerplexityResult", "perplexity"]
