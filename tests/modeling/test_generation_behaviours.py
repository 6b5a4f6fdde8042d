"""What transformers' GenerationTesterMixin and export tests would check (they are not in the transformers sdist, see
tests/modeling/transformers_suite.py): attention outputs in forward and in `generate`'s dict outputs, the static
cache, `torch.compile` of the decode step, `torch.export`, the QK-clip statistic under flex attention, refused
features, live config fields and batch-first outputs."""

import pytest
import torch
from transformers import StaticCache

from modeling_forge import ForgeConfig, ForgeForCausalLM, ForgeModel


def _model(config, seed=0, attn="eager"):
    torch.manual_seed(seed)
    model = ForgeForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    return model


def _left_padded_batch():
    gen = torch.Generator().manual_seed(7)
    short, long = torch.randint(1, 97, (5,), generator=gen), torch.randint(1, 97, (11,), generator=gen)
    input_ids = torch.zeros(2, 11, dtype=torch.long)
    attention_mask = torch.zeros(2, 11, dtype=torch.long)
    input_ids[0, 6:], attention_mask[0, 6:] = short, 1
    input_ids[1], attention_mask[1] = long, 1
    return input_ids, attention_mask


def _wide(tiny_config, **overrides):
    """A wide init, so an untrained model's greedy stream depends on its context (std 0.02 repeats one token)."""
    return tiny_config(pad_token_id=0, eos_token_id=None, initializer_range=0.3, **overrides)


def test_output_attentions_in_forward_are_the_sliding_window_softmax(tiny_config):
    model = _model(tiny_config(sliding_window=4))
    x = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        out = model(x, output_attentions=True)
        base = model.model(x, output_attentions=True)
        plain = model(x)
    assert plain.attentions is None
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights, base_weights in zip(out.attentions, base.attentions, strict=True):
        assert weights.shape == (2, model.config.num_attention_heads, 9, 9)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, model.config.num_attention_heads, 9))
        q, k = torch.arange(9)[:, None], torch.arange(9)[None, :]
        outside = (k > q) | (q - k >= 4)  # future keys, and keys beyond the window of 4
        assert weights[..., outside].abs().max() == 0
        assert weights[..., ~outside].min() > 0
        torch.testing.assert_close(weights, base_weights)
    torch.testing.assert_close(out.logits, plain.logits)  # recording changes nothing


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_generate_dict_outputs_carry_attentions(tiny_config, mode, use_cache):
    model = _model(_wide(tiny_config))
    input_ids, attention_mask = _left_padded_batch()
    kwargs = {"max_new_tokens": 4, "pad_token_id": 0, "use_cache": use_cache}
    kwargs |= {"sample": {"do_sample": True, "top_k": 5}, "greedy": {"do_sample": False}}.get(mode, {})
    kwargs |= {"num_beams": 2, "do_sample": False} if mode == "beam" else {}
    rows = 2 * kwargs.get("num_beams", 1)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, return_dict_in_generate=True,
                             output_attentions=True, output_scores=True, **kwargs)  # fmt: skip
        torch.manual_seed(1)
        plain = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    assert torch.equal(out.sequences, plain)
    assert len(out.attentions) == 4 == len(out.scores)
    heads = model.config.num_attention_heads
    for step, per_layer in enumerate(out.attentions):
        assert len(per_layer) == model.config.num_hidden_layers
        length = 11 + step
        queries = 1 if use_cache and step > 0 else length
        keys = min(length, model.config.sliding_window) if use_cache and step > 0 else length
        assert per_layer[0].shape == (rows, heads, queries, keys)
        assert torch.isfinite(per_layer[0]).all()


@pytest.mark.parametrize("memory_type", ["ema", "none"])
def test_static_cache_generation_equals_dynamic_and_uncached(tiny_config, memory_type):
    """Greedy, window 8 exceeded many times over, left padding: static, dynamic and no cache give the same tokens."""
    model = _model(_wide(tiny_config, memory_type=memory_type, sliding_window=8), attn="sdpa")
    input_ids, attention_mask = _left_padded_batch()
    kwargs = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0, "attention_mask": attention_mask}
    with torch.no_grad():
        dynamic = model.generate(input_ids, **kwargs)
        static = model.generate(input_ids, cache_implementation="static", **kwargs)
        uncached = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(static, dynamic) and torch.equal(static, uncached)
    assert len(set(static[1, 11:].tolist())) > 5  # not a degenerate constant stream


def test_beam_search_reorders_the_memory_state_with_the_cache(tiny_config):
    """Beams are reordered every step; the memory state must follow its beam (dynamic and static cache alike)."""
    model = _model(_wide(tiny_config, sliding_window=8), attn="sdpa")
    input_ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(7))
    kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0, "num_beams": 3}
    with torch.no_grad():
        dynamic = model.generate(input_ids, **kwargs)
        static = model.generate(input_ids, cache_implementation="static", **kwargs)
        uncached = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(dynamic, uncached) and torch.equal(static, uncached)


def test_generate_prepares_sliding_window_masks_for_the_static_cache(tiny_config):
    """transformers' generic `create_masks_for_generate` gives `hybrid_sliding` layers a full causal mask; ours is
    the sliding window, so a prefill longer than the window sees the same keys as the dynamic path."""
    model = _model(tiny_config(sliding_window=4, pad_token_id=0), attn="eager")
    x = torch.randint(1, 97, (1, 10))
    cache = StaticCache(config=model.config, max_cache_len=16)
    embeds = torch.empty(1, 10, 0)
    masks = model.create_masks_for_generate(config=model.config, inputs_embeds=embeds, attention_mask=None,
                                            past_key_values=cache, position_ids=torch.arange(10)[None])  # fmt: skip
    with torch.no_grad():
        via_dict = model(x, attention_mask=masks, past_key_values=cache, use_cache=True).logits
        dynamic = model(x).logits
    torch.testing.assert_close(via_dict, dynamic)


def test_assisted_decoding_is_refused_for_the_recurrent_state(tiny_config):
    model = _model(tiny_config())
    x = torch.randint(1, 97, (1, 6))
    with pytest.raises(ValueError, match="stateful"):
        model.generate(x, assistant_model=model, max_new_tokens=3)
    with pytest.raises(ValueError, match="stateful"):
        model.generate(x, prompt_lookup_num_tokens=2, max_new_tokens=3)


@pytest.mark.parametrize(
    "field, value, base",
    [
        ("memory_decay", 0.5, {"memory_type": "ema"}),  # read by the ema memory only
        ("memory_forget_scale", 50.0, {}),  # the neural memory's forgetting
        ("trm_micro_steps", 1, {}),
        ("trm_max_steps", 1, {}),
        ("act_threshold", 0.9, {}),
    ],
)
def test_config_fields_are_read_live(tiny_config, field, value, base):
    """A field changed on a built model acts exactly as if the model had been built with it."""
    x = torch.randint(1, 97, (4, 16), generator=torch.Generator().manual_seed(3))

    def model(**overrides) -> ForgeForCausalLM:
        built = _model(_wide(tiny_config, **base, **overrides))
        with torch.no_grad():  # every weight drawn the same way, zero-initialised ones too, so the refiner acts
            generator = torch.Generator().manual_seed(1)
            for parameter in built.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
        return built

    live = model()
    setattr(live.config, field, value)
    live.config.trm_step_weights = None  # re-derived for a new trm_max_steps
    live.config.check()
    built = model(**{field: value})
    before = model()
    with torch.no_grad():
        got, want, old = (m(x, output_step_logits=True) for m in (live, built, before))
    assert torch.equal(got.logits, want.logits) and torch.equal(got.halt_steps, want.halt_steps)
    assert len(got.step_logits) == live.config.trm_max_steps + 1
    changed = (got.logits - old.logits).abs().max() > 1e-4 or not torch.equal(got.halt_steps, old.halt_steps)
    assert changed  # the field matters for this input, so the equality above is not vacuous


def test_layer_types_set_by_hand_are_validated():
    with pytest.raises(ValueError, match="layer_types"):
        ForgeConfig.from_preset("tiny", layer_types=["full_attention", "full_attention"])
    with pytest.raises(ValueError, match="layer_types"):
        ForgeConfig.from_preset("tiny", num_hidden_layers=3, layer_types=["hybrid_sliding"] * 2)
    config = ForgeConfig.from_preset("tiny", layer_types=["hybrid_sliding"] * 2)  # the derived value is accepted
    config.memory_type = "none"  # a derived value follows the field it came from
    ForgeForCausalLM(config)
    assert config.layer_types == ["sliding_attention"] * 2
    assert "_derived_layer_types" not in config.to_dict()
    config.layer_types = ["full_attention"] * 2
    with pytest.raises(ValueError, match="layer_types"):
        ForgeForCausalLM(config)


def test_base_model_outputs_are_batch_first(tiny_config):
    """Pipelines split a batched output by row: every field must be batch-first, and row i equals input i alone."""
    torch.manual_seed(0)
    model = ForgeModel(tiny_config()).eval()
    x = torch.randint(1, 97, (3, 10))
    with torch.no_grad():
        batched = model(x, use_cache=False)
        alone = model(x[1:2], use_cache=False)
    for name, value in batched.items():
        tensors = value if isinstance(value, tuple) else (value,)
        for tensor in tensors:
            assert tensor.shape[0] == 3, name
    assert batched.gate_means.shape == (3, model.config.num_hidden_layers)
    assert batched.gate_entropy.shape == (3,)
    torch.testing.assert_close(batched.gate_means[1:2], alone.gate_means)
    torch.testing.assert_close(batched.gate_entropy[1:2], alone.gate_entropy)


def test_feature_extraction_and_text_generation_pipelines_batched(tiny_config, tiny_tokenizer):
    from transformers import pipeline

    config = _wide(tiny_config, vocab_size=len(tiny_tokenizer), sliding_window=16)
    config.pad_token_id = tiny_tokenizer.pad_token_id
    model = _model(config, attn="sdpa")
    texts = ["To be, or not to be", "Now is the winter of our discontent made glorious", "All the world"]
    tiny_tokenizer.padding_side = "right"
    extractor = pipeline("feature-extraction", model=model.model, tokenizer=tiny_tokenizer)
    batched = extractor(texts, batch_size=2)
    for text, features in zip(texts, batched, strict=True):
        alone = torch.tensor(extractor(text))
        n_tokens = len(tiny_tokenizer(text)["input_ids"])
        assert alone.shape == (1, n_tokens, config.hidden_size)
        # A batched row is padded on the right to its batch's longest text; the real positions equal the text alone.
        torch.testing.assert_close(torch.tensor(features)[:, :n_tokens], alone, rtol=1e-4, atol=1e-4)
    tiny_tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer)
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    together = [out[0]["generated_text"] for out in generator(texts, batch_size=3, **kwargs)]
    assert together == [generator(text, **kwargs)[0]["generated_text"] for text in texts]
    assert all(len(full) > len(text) for full, text in zip(together, texts, strict=True))


@pytest.mark.slow
def test_compiled_decode_step_with_static_cache_gives_the_same_tokens(tiny_config):
    """`torch.compile` of the forward (prefill and every decode step) under the static cache."""
    model = _model(_wide(tiny_config, sliding_window=8), attn="sdpa")
    input_ids, attention_mask = _left_padded_batch()
    kwargs = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0, "attention_mask": attention_mask}
    with torch.no_grad():
        eager = model.generate(input_ids, cache_implementation="static", **kwargs)
        model.forward = torch.compile(model.forward, dynamic=None)  # as benchmarks/generation.py
        compiled = model.generate(input_ids, cache_implementation="static", **kwargs)
    assert torch.equal(compiled, eager)


def _prefill_then_decode(model, forward, input_ids):
    """Logits of a static-cache prefill and of the decode step after it, through `forward`."""
    cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + 8)
    with torch.no_grad():
        prefill = forward(input_ids=input_ids[:, :-1], past_key_values=cache, use_cache=True).logits
        decode = forward(input_ids=input_ids[:, -1:], past_key_values=cache, use_cache=True).logits
    return prefill, decode


# torch 2.13's inductor (CPU) reuses a buffer that is still live in this decode graph (neural memory, two layers): the
# cache it writes is right, the logits are not (found with benchmarks/generation.py --preset tiny). Turning off its
# buffer reuse (`inplace_buffers` or `allow_buffer_reuse`) makes the graph exact, so the benchmark compiles that way.
# The graph that triggers it is the one with the MAG gate mixing the normed branches (`mag_mix="normed"`); the
# default mix and the raw one compile exactly either way (the test above compiles the default with buffer reuse on), so
# this test pins the triggering graph to keep tracking the bug.
_INDUCTOR_BUG = pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="inductor buffer-reuse bug in torch 2.13; see the comment"
)


@pytest.mark.slow
@pytest.mark.parametrize("inplace_buffers", [pytest.param(True, marks=_INDUCTOR_BUG), False])
def test_compiled_static_cache_decode_step_equals_eager(inplace_buffers):
    """One compiled decode step after a compiled prefill equals eager (tiny preset: neural memory, two layers)."""
    config = ForgeConfig.from_preset("tiny", pad_token_id=0, eos_token_id=None, initializer_range=0.1,
                                     trm_attention=False, mag_mix="normed")  # fmt: skip
    torch.manual_seed(0)
    model = ForgeForCausalLM(config).eval()
    input_ids = torch.randint(1, config.vocab_size, (1, 17))
    eager = _prefill_then_decode(model, model.forward, input_ids)
    torch._dynamo.reset()
    with torch._inductor.config.patch(inplace_buffers=inplace_buffers):
        compiled = _prefill_then_decode(model, torch.compile(model.forward, dynamic=None), input_ids)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)


class _DecodeStep(torch.nn.Module):
    """One decode step over a static cache whose tensors are registered as buffers, so `torch.export` sees the cache
    updates as buffer mutations (as transformers' executorch wrappers do for their caches)."""

    def __init__(self, model: ForgeForCausalLM, cache: StaticCache, act_halting: bool) -> None:
        super().__init__()
        self.model, self.cache, self.act_halting = model, cache, act_halting
        for i, layer in enumerate(cache.layers):
            for name in ("keys", "values", "cumulative_length"):
                self.register_buffer(f"{name}_{i}", getattr(layer, name), persistent=False)
            for j, state in enumerate(layer.recurrent_states if hasattr(layer, "recurrent_states") else []):
                if isinstance(state, torch.Tensor):
                    self.register_buffer(f"state_{i}_{j}", state, persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache, use_cache=True,
                         act_halting=self.act_halting)  # fmt: skip
        return out.logits


@pytest.mark.slow
def test_decode_step_exports_with_the_static_cache(tiny_config):
    """`torch.export` of the decode step once the window is full (the static sliding cache tracks its length in a
    Python int, so the exported step is the steady-state one): 10 exported steps equal 10 eager steps."""
    model = _model(_wide(tiny_config, sliding_window=8), attn="sdpa")
    prompt = torch.randint(1, 97, (1, 12))

    def prefill() -> tuple[_DecodeStep, torch.Tensor]:
        cache = StaticCache(config=model.config, max_cache_len=64)
        with torch.no_grad():
            logits = model(prompt, past_key_values=cache, use_cache=True, act_halting=False).logits
        return _DecodeStep(model, cache, act_halting=False), logits[:, -1:].argmax(-1)

    step, token = prefill()
    with torch.no_grad():
        program = torch.export.export(step, (token, torch.tensor([[12]])), strict=False)
    eager, token = prefill()
    exported = program.module()
    for name, buffer in eager.named_buffers():  # start the exported step from the same freshly prefilled cache
        if "." not in name:
            getattr(exported, name).copy_(buffer)
    tokens = {"eager": [], "exported": []}
    next_eager = next_exported = token
    for i in range(10):
        position = torch.tensor([[12 + i]])
        with torch.no_grad():
            want, got = eager(next_eager, position), exported(next_exported, position)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        next_eager, next_exported = want[:, -1:].argmax(-1), got[:, -1:].argmax(-1)
        tokens["eager"].append(int(next_eager))
        tokens["exported"].append(int(next_exported))
    assert tokens["eager"] == tokens["exported"] and len(set(tokens["eager"])) > 3


@pytest.mark.slow
def test_attention_logit_max_under_flex_attention_equals_sdpa(tiny_config):
    """The QK-clip statistic reads a flex `BlockMask` (not a tensor) by evaluating its mask function."""
    model = _model(tiny_config(sliding_window=8, pad_token_id=0), attn="sdpa")
    x = torch.randint(1, 97, (2, 20))
    attention_mask = torch.ones_like(x)
    attention_mask[0, :5] = 0
    with torch.no_grad():  # flex attention has no CPU backward
        sdpa = model(x, attention_mask=attention_mask, output_attention_logit_max=True)
        model.set_attn_implementation("flex_attention")
        flex = model(x, attention_mask=attention_mask, output_attention_logit_max=True)
    torch.testing.assert_close(flex.attention_logit_max, sdpa.attention_logit_max)
    torch.testing.assert_close(flex.logits, sdpa.logits, rtol=1e-4, atol=1e-4)
