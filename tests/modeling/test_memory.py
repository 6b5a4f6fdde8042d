"""The long-term memories: the gated delta rule (Titans' linear memory) chunked vs per-token, its analytic recall,
streaming, causality, fp32 state, document resets under padding-free packing, and gate statistics on real tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_forge import ForgeForCausalLM, ema_scan, gated_delta_rule_chunked, gated_delta_rule_recurrent
from modeling_forge.modeling_forge import (
    ForgeNeuralMemory,
    deep_memory_chunked,
    short_causal_conv,
    titans_momentum_chunked,
    titans_momentum_recurrent,
)


def _inputs(batch=2, heads=3, length=37, d_k=8, d_v=5, dtype=torch.float64, seed=0, g_scale=1.0, beta=None):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, d_k, generator=generator).to(dtype)
    k = F.normalize(torch.randn(batch, heads, length, d_k, generator=generator), dim=-1).to(dtype)
    v = torch.randn(batch, heads, length, d_v, generator=generator).to(dtype)
    g = (-torch.rand(batch, heads, length, generator=generator) * g_scale).to(dtype)
    b = torch.rand(batch, heads, length, generator=generator).to(dtype) if beta is None else torch.full_like(g, beta)
    return q, k, v, g, b


def _model(config, seed=0):
    torch.manual_seed(seed)
    return ForgeForCausalLM(config)


@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize(
    "case",
    [
        {"g_scale": 1.0},
        {"g_scale": 0.0},  # g = 0: no forgetting
        {"g_scale": 30.0},  # strong decay: exp(cumulative g) underflows inside a chunk
        {"beta": 1e-9},  # b -> 0: nothing written
        {"beta": 1.0},  # b = 1: each write replaces the value stored under its key
    ],
)
def test_chunked_equals_recurrent_outputs_state_and_gradients(chunk, case):
    """T=37 is not a multiple of any chunk size; float64 to 1e-10, with an initial state and documents."""
    q, k, v, g, b = (x.requires_grad_() for x in _inputs(**case))
    initial = torch.randn(2, 3, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 3, 37, 5, dtype=torch.float64)
    for segments in (None, torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [1] * 30 + [2] * 7])):
        results = []
        for form in (lambda *a: gated_delta_rule_chunked(*a, chunk_size=chunk), gated_delta_rule_recurrent):
            out, state = form(q, k, v, g, b, initial, segments)
            grads = torch.autograd.grad((out * weights).sum() + state.sum(), (q, k, v, g, b))
            results.append((out, state, grads))
        (out_c, state_c, grads_c), (out_r, state_r, grads_r) = results
        torch.testing.assert_close(out_c, out_r, rtol=0, atol=1e-10)
        torch.testing.assert_close(state_c, state_r, rtol=0, atol=1e-10)
        for grad_c, grad_r in zip(grads_c, grads_r, strict=True):
            torch.testing.assert_close(grad_c, grad_r, rtol=0, atol=1e-10)


def test_chunked_equals_recurrent_in_fp32_and_keeps_fp32_for_bf16():
    q, k, v, g, b = _inputs(length=200, d_k=16, d_v=16, dtype=torch.float32, g_scale=0.05)
    out_c, state_c = gated_delta_rule_chunked(q, k, v, g, b, chunk_size=64)
    out_r, state_r = gated_delta_rule_recurrent(q, k, v, g, b)
    assert (out_c - out_r).abs().max() <= 1e-5 and (state_c - state_r).abs().max() <= 1e-5
    out_bf, state_bf = gated_delta_rule_chunked(*(x.bfloat16() for x in (q, k, v, g, b)), chunk_size=64)
    assert out_bf.dtype == torch.float32 and state_bf.dtype == torch.float32


def test_gradcheck_tiny_case():
    q, k, v, g, b = (x.requires_grad_() for x in _inputs(batch=1, heads=1, length=6, d_k=3, d_v=2))
    assert torch.autograd.gradcheck(lambda *a: gated_delta_rule_chunked(*a, chunk_size=4)[0], (q, k, v, g, b))


def test_streaming_in_pieces_equals_one_run():
    q, k, v, g, b = _inputs(length=50)
    whole, final = gated_delta_rule_chunked(q, k, v, g, b, chunk_size=16)
    pieces, state = [], None
    for start, end in ((0, 7), (7, 8), (8, 31), (31, 50)):
        part = (x[:, :, start:end] for x in (q, k, v, g, b))
        out, state = gated_delta_rule_chunked(*part, initial_state=state, chunk_size=16)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 2), whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(state, final, rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_analytic_recall_at_any_distance_and_overwrite(form):
    """b = 1, g = 0, orthonormal keys: reading with q = k_i returns v_i however far back; a key written twice
    returns its second value."""
    run = gated_delta_rule_recurrent if form == "recurrent" else lambda *a: gated_delta_rule_chunked(*a, chunk_size=16)
    d, length = 8, 70
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]  # orthonormal columns
    key_ids = torch.tensor([0, 1, 2, 3] + [4] * (length - 6) + [2, 5])  # key 2 rewritten near the end
    keys = basis.T[key_ids][None, None]  # (1, 1, T, d)
    values = torch.randn(1, 1, length, 4, dtype=torch.float64)
    queries = torch.zeros_like(keys)
    _, state = run(queries, keys, values, torch.zeros(1, 1, length, dtype=torch.float64),
                   torch.ones(1, 1, length, dtype=torch.float64))  # fmt: skip
    read = lambda i: torch.einsum("kv,k->v", state[0, 0], basis[:, i])  # noqa: E731
    for i, position in ((0, 0), (1, 1), (3, 3)):  # written 66-69 tokens before the end
        torch.testing.assert_close(read(i), values[0, 0, position], rtol=0, atol=1e-10)
    torch.testing.assert_close(read(2), values[0, 0, length - 2], rtol=0, atol=1e-10)  # the second write wins
    assert (read(2) - values[0, 0, 2]).abs().max() > 1e-3


def test_outputs_are_causal():
    q, k, v, g, b = _inputs(length=40)
    out, _ = gated_delta_rule_chunked(q, k, v, g, b, chunk_size=16)
    for t in (0, 15, 16, 39):
        changed = [x.clone() for x in (q, k, v, g, b)]
        for x in changed:
            x[:, :, t:] = x[:, :, t:] + 1.0 if x.dim() == 4 else x[:, :, t:] * 0.5
        out2, _ = gated_delta_rule_chunked(*changed, chunk_size=16)
        torch.testing.assert_close(out2[:, :, :t], out[:, :, :t], rtol=0, atol=1e-12)
        assert (out2[:, :, t:] - out[:, :, t:]).abs().max() > 1e-6


def test_short_conv_matches_conv1d_and_respects_documents_and_tail():
    """Inputs (B, T, C), tail (B, C, K-1) as the cache keeps it; equal to nn.Conv1d's depthwise causal convolution."""
    x = torch.randn(2, 6, 12, dtype=torch.float64)  # (B, C, T) for conv1d
    weight = torch.randn(6, 4, dtype=torch.float64)
    expected = F.conv1d(F.pad(x, (3, 0)), weight[:, None], groups=6).transpose(1, 2)  # (B, T, C)
    xt = x.transpose(1, 2)
    torch.testing.assert_close(short_causal_conv(xt, weight, None, None), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(short_causal_conv(xt[:, 5:], weight, x[..., 2:5], None), expected[:, 5:])
    segments = torch.tensor([[0] * 5 + [1] * 7] * 2)
    split = short_causal_conv(xt, weight, None, segments)
    torch.testing.assert_close(split[:, 5:], short_causal_conv(xt[:, 5:], weight, None, None))
    assert (split[:, 5:8] - expected[:, 5:8]).abs().max() > 1e-6


def test_forgetting_starts_slow_log_uniform(tiny_config):
    """softplus(dt_bias) lies in [memory_dt_min, memory_dt_max] and A = 1, so a_t starts near 0.99-0.999."""
    model = _model(tiny_config(memory_type="neural", memory_num_heads=32, memory_size=64))
    memory = model.model.layers[0].memory
    dt = F.softplus(memory.dt_bias)
    assert isinstance(memory, ForgeNeuralMemory)
    assert dt.min() >= 0.001 - 1e-7 and dt.max() <= 0.01 + 1e-7 and dt.std() > 0
    assert torch.log(dt).mean().item() == pytest.approx((math.log(0.001) + math.log(0.01)) / 2, abs=0.4)
    assert memory.A_log.abs().max() == 0


@pytest.mark.parametrize("memory_type", ["neural", "ema"])
def test_packed_documents_do_not_see_each_others_memory(tiny_config, memory_type):
    """Padding-free packing (position_ids restarting, no mask): each document's logits equal its own run; the same
    tokens without the restart (one long document) differ, so the check can fail."""
    model = _model(tiny_config(memory_type=memory_type, sliding_window=64, initializer_range=0.3)).double().eval()
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 97, (1, n), generator=gen) for n in (13, 20, 7)]
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
        as_one = model(packed, use_cache=False).logits
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-10)
    assert (as_one[:, 13:] - alone[:, 13:]).abs().max() > 1e-4


def test_right_padding_writes_nothing(tiny_config):
    """The neural memory's state after a right-padded row equals the state after the bare row (a padded position
    neither writes nor forgets; the EMA ablation's scalar decay keeps running over padding)."""
    model = _model(tiny_config(memory_type="neural", pad_token_id=0, initializer_range=0.3)).double().eval()
    row = torch.randint(1, 97, (1, 15), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([row, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 15), torch.zeros(1, 5)], 1).long()
    with torch.no_grad():
        bare = model(row, use_cache=True).past_key_values
        with_pad = model(padded, attention_mask=mask, use_cache=True).past_key_values
        unmasked = model(padded, use_cache=True).past_key_values
    for layer in range(model.config.num_hidden_layers):
        expected = bare.get_recurrent_state(layer)
        torch.testing.assert_close(with_pad.get_recurrent_state(layer), expected, rtol=0, atol=1e-10)
        assert (unmasked.get_recurrent_state(layer) - expected).abs().max() > 1e-6


@pytest.mark.parametrize("memory_type", ["neural", "ema"])
def test_bf16_model_keeps_fp32_state_and_decode_matches_prefill(tiny_config, memory_type):
    """In bf16 the state stays fp32 (an EMA decay of 0.999 rounds to 1.0 in bf16), and the state after a prefill
    equals the state after decoding the same tokens one by one."""
    model = _model(tiny_config(memory_type=memory_type, memory_decay=0.999)).to(torch.bfloat16).eval()
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        prefill = model(x, use_cache=True).past_key_values
        cache = model(x[:, :1], use_cache=True).past_key_values
        for t in range(1, 12):
            cache = model(x[:, t : t + 1], past_key_values=cache, use_cache=True).past_key_values
    for layer in range(model.config.num_hidden_layers):
        state = prefill.get_recurrent_state(layer)
        assert state.dtype == torch.float32
        # bf16 activations feed both paths; the fp32 state keeps prefill and decode within bf16 input rounding
        torch.testing.assert_close(cache.get_recurrent_state(layer), state, rtol=0.05, atol=0.02)


def test_ema_scan_is_fp32_for_bf16_inputs():
    """bf16 rounds 0.999 to 1.0; the scan computes powers and states in fp32 and equals the fp32 scan."""
    inputs = torch.randn(2, 300, 4)
    states, _ = ema_scan(inputs.bfloat16(), 0.999, chunk_size=64)
    expected, _ = ema_scan(inputs.bfloat16().float(), 0.999, chunk_size=64)
    assert states.dtype == torch.float32
    torch.testing.assert_close(states, expected, rtol=0, atol=1e-5)


def test_gate_statistics_count_real_tokens_only(tiny_config):
    """A left-padded row reports the gate mean and entropy of its real tokens (padding excluded)."""
    model = _model(tiny_config(memory_type="neural", pad_token_id=0, initializer_range=0.3)).eval()
    row = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(6))
    padded = torch.cat([torch.zeros(1, 30, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 30), torch.ones(1, 10)], 1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        bare = model.model(row, act_halting=False)
        with_pad = model.model(padded, attention_mask=mask, position_ids=positions, act_halting=False)
    torch.testing.assert_close(with_pad.gate_means, bare.gate_means, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_pad.gate_entropy, bare.gate_entropy, rtol=0, atol=1e-5)


# ---- Titans momentum and deep memory (flags memory_momentum / memory_deep) ----------------------------------------


def _eta(batch=2, heads=3, length=37, dtype=torch.float64, seed=7, value=None):
    if value is not None:
        return torch.full((batch, heads, length), value, dtype=dtype)
    return torch.rand(batch, heads, length, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_momentum_chunked_equals_its_per_token_reference(chunk):
    """The mini-batch momentum form in parallel equals the token-by-token loop (outputs, state, gradients), T=37 not a
    multiple of the chunk, with an initial state and packed documents, float64 to 1e-10."""
    q, k, v, g, b = (x.requires_grad_() for x in _inputs())
    eta = _eta().requires_grad_()
    initial = torch.randn(2, 3, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 3, 37, 5, dtype=torch.float64)
    for segments in (None, torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [1] * 30 + [2] * 7])):
        results = []
        for form in (titans_momentum_chunked, titans_momentum_recurrent):
            start = initial if form is titans_momentum_chunked else (initial, torch.zeros_like(initial), initial)
            out, carry = form(q, k, v, g, b, eta, start, segments, chunk)
            loss = (out * weights).sum() + sum(x.sum() * (i + 1) for i, x in enumerate(carry))
            results.append((out, carry, torch.autograd.grad(loss, (q, k, v, g, b, eta))))
        (out_c, carry_c, grads_c), (out_r, carry_r, grads_r) = results
        torch.testing.assert_close(out_c, out_r, rtol=0, atol=1e-10)
        for state_c, state_r in zip(carry_c, carry_r, strict=True):  # S, momentum Z, gradient point G
            torch.testing.assert_close(state_c, state_r, rtol=0, atol=1e-10)
        for grad_c, grad_r in zip(grads_c, grads_r, strict=True):
            torch.testing.assert_close(grad_c, grad_r, rtol=0, atol=1e-10)


def test_momentum_reduces_to_the_delta_rule_and_to_the_plain_mini_batch_update():
    """eta = 0 with one-token chunks is the gated delta rule exactly; with 16-token chunks eta = 0 is the plain
    mini-batch update (gradients at the chunk-start memory), which differs from the delta rule, and momentum > 0
    changes the outputs again (so each comparison can fail)."""
    q, k, v, g, b = _inputs(g_scale=0.1)
    zero = _eta(value=0.0)
    expected, expected_state = gated_delta_rule_recurrent(q, k, v, g, b)
    out, (state, _, _) = titans_momentum_chunked(q, k, v, g, b, zero, chunk_size=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=1e-10)
    mini_batch, _ = titans_momentum_chunked(q, k, v, g, b, zero, chunk_size=16)
    assert (mini_batch - expected).abs().max() > 1e-3
    torch.testing.assert_close(mini_batch[:, :, :1], expected[:, :, :1], rtol=0, atol=1e-10)  # same first token
    with_momentum, _ = titans_momentum_chunked(q, k, v, g, b, _eta(value=0.9), chunk_size=16)
    assert (with_momentum - mini_batch).abs().max() > 1e-3


def test_momentum_streams_token_by_token_from_the_chunked_prefill():
    """A chunked prefill of 11 tokens, then the recurrence from its carried (S, Z, G) and chunk offset, token by token
    and in a 9-token piece, equals one run (chunk 4: the prefill ends mid-chunk)."""
    q, k, v, g, b = _inputs(length=30)
    eta = _eta(length=30)
    whole, whole_carry = titans_momentum_chunked(q, k, v, g, b, eta, chunk_size=4)
    pieces, carry = [], None
    for start, end in ((0, 11), (11, 12), (12, 13), (13, 22), (22, 30)):
        part = [x[:, :, start:end] for x in (q, k, v, g, b, eta)]
        if carry is None:
            out, carry = titans_momentum_chunked(*part, chunk_size=4)
        else:
            out, carry = titans_momentum_recurrent(*part, initial_state=carry, chunk_size=4, offset=start % 4)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 2), whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(carry[0], whole_carry[0], rtol=0, atol=1e-10)
    _, after_prefill = titans_momentum_chunked(*(x[:, :, :11] for x in (q, k, v, g, b, eta)), chunk_size=4)
    rest = (x[:, :, 11:] for x in (q, k, v, g, b, eta))
    wrong, _ = titans_momentum_recurrent(*rest, initial_state=after_prefill, chunk_size=4, offset=0)
    assert (wrong - whole[:, :, 11:]).abs().max() > 1e-4  # the chunk offset matters


def test_momentum_is_causal():
    q, k, v, g, b = _inputs(length=40)
    eta = _eta(length=40)
    out, _ = titans_momentum_chunked(q, k, v, g, b, eta, chunk_size=16)
    for t in (0, 15, 16, 39):
        changed = [x.clone() for x in (q, k, v, g, b, eta)]
        for x in changed:
            x[:, :, t:] = x[:, :, t:] + 1.0 if x.dim() == 4 else x[:, :, t:] * 0.5
        out2, _ = titans_momentum_chunked(*changed, chunk_size=16)
        torch.testing.assert_close(out2[:, :, :t], out[:, :, :t], rtol=0, atol=1e-12)
        assert (out2[:, :, t:] - out[:, :, t:]).abs().max() > 1e-6


def _naive_deep_memory(q, k, v, g, b, eta, w1, w2, chunk):
    """Per row, head and chunk: read with the current weights, then one autograd step on the chunk's summed loss."""
    batch, heads, length, _ = k.shape
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=q.dtype)
    for i in range(batch):
        for h in range(heads):
            weights, momentum = [w1[h], w2[h]], [torch.zeros_like(w1[h]), torch.zeros_like(w2[h])]
            for start in range(0, length, chunk):
                s = slice(start, start + chunk)
                out[i, h, s] = F.silu(q[i, h, s] @ weights[0]) @ weights[1]
                leaves = [w.detach().requires_grad_() for w in weights]
                pred = F.silu(k[i, h, s] @ leaves[0]) @ leaves[1]
                loss = (b[i, h, s, None] * (pred - v[i, h, s]).square()).sum() / 2
                grads = torch.autograd.grad(loss, leaves)
                forget = g[i, h, s].sum().exp()
                keep = 0.0 if eta is None else eta[i, h, s].mean()
                momentum = [keep * z - dw for z, dw in zip(momentum, grads, strict=True)]
                weights = [forget * w + z for w, z in zip(weights, momentum, strict=True)]
    return out


@pytest.mark.parametrize("momentum", [False, True])
def test_deep_memory_matches_a_naive_per_chunk_loop(momentum):
    q, k, v, g, b = _inputs(length=21, d_k=4, d_v=4, g_scale=0.1)
    gen = torch.Generator().manual_seed(2)
    w1 = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64) * 0.5
    w2 = torch.randn(3, 8, 4, generator=gen, dtype=torch.float64) * 0.35
    eta = _eta(length=21) if momentum else None
    out, _ = deep_memory_chunked(q, k, v, g, b, eta, (w1, w2), chunk_size=8)
    torch.testing.assert_close(out, _naive_deep_memory(q, k, v, g, b, eta, w1, w2, 8), rtol=1e-10, atol=1e-10)
    assert (out[:, :, 8:] - (F.silu(q[:, :, 8:] @ w1[None]) @ w2[None])).abs().max() > 1e-3  # the memory was written


def test_deep_memory_is_causal_by_chunk_and_differentiable():
    """A token reads the weights entering its chunk: changing position t leaves every earlier chunk unchanged; the
    outputs are differentiable in the inputs and the initial weights (gradients through torch.func.grad)."""
    q, k, v, g, b = (x.requires_grad_() for x in _inputs(length=24, d_k=4, d_v=4, g_scale=0.1))
    w1 = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 8, 4, dtype=torch.float64, requires_grad=True)
    out, _ = deep_memory_chunked(q, k, v, g, b, None, (w1, w2), chunk_size=8)
    grads = torch.autograd.grad(out.square().sum(), (k, v, g, b, w1, w2))
    assert all(grad.abs().sum() > 0 for grad in grads)
    with torch.no_grad():
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, :, 10:] += 1.0
        out2, _ = deep_memory_chunked(*changed, g, b, None, (w1, w2), chunk_size=8)
    torch.testing.assert_close(out2[:, :, :16][:, :, :10], out[:, :, :10].detach(), rtol=0, atol=1e-12)
    assert (out2[:, :, 16:] - out[:, :, 16:]).abs().max() > 1e-6  # the next chunk reads what position 10+ wrote


@pytest.mark.parametrize(
    "flags", [{"memory_momentum": True}, {"memory_deep": True}, {"memory_deep": True, "memory_momentum": True}]
)
def test_titans_flags_model_causal_trainable_round_trip_and_cache(tiny_config, tmp_path, flags):
    """Causal, every new parameter learns, save/load gives identical logits; momentum alone decodes with the cache
    exactly as without it (left padding included), the deep memory refuses to continue from a cache."""
    config = tiny_config(memory_type="neural", memory_chunk_size=8, initializer_range=0.3, **flags)
    model = _model(config).eval()
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = model(x, use_cache=False).logits
        changed = x.clone()
        changed[:, 12] = (changed[:, 12] + 1) % 97
        logits2 = model(changed, use_cache=False).logits
    torch.testing.assert_close(logits2[:, :12], logits[:, :12], rtol=0, atol=1e-6)
    assert (logits2[:, 12:] - logits[:, 12:]).abs().max() > 1e-4
    # the new parameters learn
    model.train()
    model(x, labels=x).loss.backward()
    memory = model.model.layers[0].memory
    new = [memory.eta_proj.weight] if config.memory_momentum else []
    new += [memory.deep_w1, memory.deep_w2] if config.memory_deep else []
    assert new and all(p.grad is not None and p.grad.abs().sum() > 0 for p in new)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = ForgeForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, use_cache=False).logits, logits, rtol=0, atol=0)
        cache = model(x[:, :9], use_cache=True).past_key_values  # a prefill with a cache equals the uncached run
        if config.memory_deep:
            with pytest.raises(ValueError, match="memory_deep: cached decoding cannot continue"):
                model(x[:, 9:10], past_key_values=cache, use_cache=True)
            return
        model.double()  # float64: the cached path equals the uncached one to rounding, not just to fp32 noise
        logits = model(x, use_cache=False).logits
        cache = model(x[:, :9], use_cache=True).past_key_values
        steps = [model(x[:, :9], use_cache=True).logits]
        for t in range(9, 20):  # prefill ends mid-chunk (chunk 8), then one token at a time
            steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=0, atol=1e-10)
        # left padding: generate with the cache == without it
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[0, :5] = 0
        padded = x.masked_fill(mask == 0, 0)
        kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        with_cache = model.generate(padded, use_cache=True, **kwargs)
        without = model.generate(padded, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"memory_type": "ema", "memory_momentum": True}, "memory_momentum"),
        ({"memory_type": "none", "memory_deep": True}, "memory_deep"),
        ({"memory_type": "neural", "memory_deep": True, "memory_deep_expansion": 0}, "memory_deep_expansion"),
    ],
)
def test_titans_flags_are_validated(tiny_config, fields, field):
    with pytest.raises(ValueError, match=f"ForgeConfig.{field} .*Fix"):
        ForgeForCausalLM(tiny_config(**fields))
    ok = {key: value for key, value in fields.items() if key == "memory_type"}
    ForgeForCausalLM(tiny_config(**ok, memory_momentum=ok["memory_type"] == "neural"))  # valid: silent


def test_deep_memory_refuses_packed_documents(tiny_config):
    model = _model(tiny_config(memory_type="neural", memory_deep=True)).eval()
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with pytest.raises(ValueError, match="memory_deep does not support padding-free"):
        model(torch.randint(0, 97, (1, 12)), position_ids=positions, use_cache=False)


@pytest.mark.parametrize("mix", ["raw", "normed", "memory_at_attention_rms"])
def test_mag_gate_reads_normed_branches_and_mixes_each_branch_at_its_configured_scale(tiny_config, mix):
    """The gate always sees both branches RMS-normed; what it mixes: the raw branches (`raw`), the normed ones
    (`normed`: unit RMS), or the raw attention with the normed memory rescaled per token to the attention's RMS (the
    default)."""
    from modeling_forge.modeling_forge import ForgeMAGGate

    config = tiny_config(mag_mix=mix)
    gate = ForgeMAGGate(config).requires_grad_(False)
    torch.manual_seed(0)
    attn, memory = 0.05 * torch.randn(2, 5, config.hidden_size), 3.0 * torch.randn(2, 5, config.hidden_size)
    mixed, g, entropy = gate(attn, memory)
    p = g.double()
    torch.testing.assert_close(entropy.double(), -(p * p.log() + (1 - p) * (1 - p).log()), rtol=1e-4, atol=1e-6)
    normed_g = gate(attn * 40.0, memory / 7.0)[1]
    torch.testing.assert_close(g, normed_g, rtol=1e-3, atol=1e-4)  # the gate reads the normed branches
    normed_a, normed_m = gate.attn_norm(attn), gate.memory_norm(memory)
    attn_rms = attn.pow(2).mean(-1, keepdim=True).sqrt()
    expected = {
        "raw": (attn, memory),
        "normed": (normed_a, normed_m),
        "memory_at_attention_rms": (attn, normed_m * attn_rms),
    }[mix]
    torch.testing.assert_close(mixed, g * expected[0] + (1 - g) * expected[1])
    rms = mixed.pow(2).mean(-1).sqrt()
    low, high = {"raw": (1.0, 9.0), "normed": (0.3, 1.0), "memory_at_attention_rms": (0.02, 0.05)}[mix]
    assert ((rms > low) & (rms < high)).all(), rms
    # Each mode's scale law, both ways: the default is homogeneous in the attention and blind to the memory's scale.
    scaled = gate(attn * 3.0, memory * 5.0)[0]  # equal up to the norms' epsilon, 1e-3 of the output's RMS
    tolerance = {"rtol": 0.0, "atol": 1e-3 * rms.max().item()}
    if mix == "memory_at_attention_rms":
        torch.testing.assert_close(scaled, 3.0 * mixed, atol=3.0 * tolerance["atol"], rtol=0.0)
    elif mix == "normed":
        torch.testing.assert_close(scaled, mixed, **tolerance)
    else:
        assert not torch.allclose(scaled, 3.0 * mixed, rtol=1e-2) and not torch.allclose(scaled, mixed, rtol=1e-2)


@pytest.mark.parametrize("mix", ["raw", "normed", "memory_at_attention_rms"])
def test_every_mag_mix_decodes_from_the_cache_as_one_forward(tiny_config, mix):
    """Cached == uncached for each MAG mix: pieces of 1-12 tokens through the cache (window 8, chunk 4) give one
    forward's logits in float64."""
    model = _model(tiny_config(mag_mix=mix, initializer_range=0.3)).eval().double()
    x = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :11], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for start, end in ((11, 12), (12, 23), (23, 30)):
            out = model(x[:, start:end], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)


def test_mag_mix_is_validated_and_the_older_boolean_still_loads(tiny_config):
    """A wrong mix names the field; configs saved with `mag_normed_output` load as the mix it meant."""
    from modeling_forge import ForgeConfig

    with pytest.raises(ValueError, match="ForgeConfig.mag_mix is 'gated'.*Fix: use one of"):
        tiny_config(mag_mix="gated")
    assert ForgeConfig.from_dict({"mag_normed_output": True}).mag_mix == "normed"
    assert ForgeConfig.from_dict({"mag_normed_output": False}).mag_mix == "raw"
    assert "mag_normed_output" not in ForgeConfig.from_dict({"mag_normed_output": True}).to_dict()
    with pytest.raises(ValueError, match="mag_normed_output=True .* contradicts mag_mix='raw'"):
        ForgeConfig(mag_normed_output=True, mag_mix="raw")
