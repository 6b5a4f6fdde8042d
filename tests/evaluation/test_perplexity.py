"""Rolling perplexity equals exp(mean token NLL) computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.perplexity import perplexity
from modeling_forge import ForgeConfig, ForgeForCausalLM


@pytest.fixture
def model_and_texts(tiny_tokenizer):
    torch.manual_seed(0)
    config = ForgeConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id)
    texts = ["Friends, Romans, countrymen, lend me your ears;", "I come to bury Caesar, not to praise him."]
    return ForgeForCausalLM(config).eval(), texts


def _stream(tokenizer, texts):
    ids = []
    for text in texts:
        ids += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def test_single_window_perplexity_is_exp_mean_nll(model_and_texts, tiny_tokenizer):
    model, texts = model_and_texts
    ids = _stream(tiny_tokenizer, texts)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    nll = F.cross_entropy(logits, ids[1:]).item()
    result = perplexity(model, tiny_tokenizer, texts, max_length=len(ids))
    assert result.n_tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_strided_windows_score_every_token_once_with_context(model_and_texts, tiny_tokenizer):
    model, texts = model_and_texts
    ids = _stream(tiny_tokenizer, texts)
    max_length, stride = 12, 5
    expected_sum, scored = 0.0, 0
    for begin in range(0, len(ids) - 1, stride):  # the same rolling scheme, by hand
        end = min(begin + max_length, len(ids))
        with torch.no_grad():
            logits = model(ids[begin:end][None]).logits[0, :-1]
        first = max(scored + 1, begin + 1)
        for position in range(first, end):
            expected_sum += F.cross_entropy(logits[position - begin - 1], ids[position]).item()
        scored = end - 1
        if end == len(ids):
            break
    result = perplexity(model, tiny_tokenizer, texts, max_length=max_length, stride=stride)
    assert result.n_tokens == len(ids) - 1
    assert result.nll == pytest.approx(expected_sum / (len(ids) - 1), rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tiny_tokenizer, texts, max_length=8, stride=9)
