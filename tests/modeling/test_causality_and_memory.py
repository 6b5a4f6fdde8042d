"""Causality, sliding-window reach, and the long-term memory's scan, resets and padding."""

import pytest
import torch

from modeling_forge import ForgeForCausalLM, ema_scan
from modeling_forge.modeling_forge import ForgeEMAMemory


def _model(config, seed=0):
    torch.manual_seed(seed)
    return ForgeForCausalLM(config)


def _reference_scan(inputs, decay, initial=None):
    """The per-position loop the parallel scan must equal (kept only here)."""
    state = torch.zeros_like(inputs[:, 0]) if initial is None else initial.clone()
    states = []
    for x_t in inputs.unbind(1):
        state = decay * state + x_t
        states.append(state)
    return torch.stack(states, 1), state


@pytest.mark.parametrize("memory_type", ["neural", "ema", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_future_tokens_never_change_past_logits(tiny_config, memory_type, training):
    config = tiny_config(memory_type=memory_type, sliding_window=8)
    model = _model(config).train(training)
    torch.manual_seed(1)
    x = torch.randint(0, config.vocab_size, (2, 40))
    for t in (0, 7, 17, 38):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, config.vocab_size, y[:, t + 1 :].shape)
        with torch.no_grad():
            out_x = model(x, output_step_logits=True)
            out_y = model(y, output_step_logits=True)
        assert len(out_x.step_logits) == config.trm_max_steps + 1
        for step_x, step_y in zip(out_x.step_logits, out_y.step_logits, strict=True):  # every TRM step
            torch.testing.assert_close(step_x[:, : t + 1], step_y[:, : t + 1], rtol=0, atol=1e-6)
            if t < 38:  # the test is not vacuous: the future did change
                assert (step_x[:, t + 1 :] - step_y[:, t + 1 :]).abs().max() > 1e-3
        torch.testing.assert_close(out_x.logits[:, : t + 1], out_y.logits[:, : t + 1], rtol=0, atol=1e-6)


def test_window_limits_attention_and_memory_reaches_beyond(tiny_config):
    """Without memory a token influences only positions within the stacked windows (L*(W-1)); with memory, all."""
    x = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 97
    reach = 2 * (8 - 1)  # two layers, window 8
    for memory_type, expect_far_change in (("none", False), ("ema", True), ("neural", True)):
        model = _model(tiny_config(memory_type=memory_type, sliding_window=8)).eval()
        with torch.no_grad():
            diff = (model(x, act_halting=False).logits - model(y, act_halting=False).logits).abs().amax(-1)[0]
        assert diff[reach] > 1e-4  # the last position inside the receptive field does change
        far = diff[reach + 1 :].max()
        assert (far > 1e-6) == expect_far_change, (memory_type, far)


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (64, 16), (100, 32), (33, 64), (257, 64)])
@pytest.mark.parametrize("with_initial", [False, True])
def test_parallel_scan_equals_per_position_loop(length, chunk, with_initial):
    generator = torch.Generator().manual_seed(length)
    inputs = torch.randn(3, length, 5, dtype=torch.float64, generator=generator)
    initial = torch.randn(3, 5, dtype=torch.float64, generator=generator) if with_initial else None
    states, final = ema_scan(inputs, 0.97, initial, chunk_size=chunk)
    expected, expected_final = _reference_scan(inputs, 0.97, initial)
    torch.testing.assert_close(states, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=0, atol=1e-10)


def test_parallel_scan_gradients_match_loop():
    inputs = torch.randn(2, 50, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 50, 4, dtype=torch.float64)
    (ema_scan(inputs, 0.9, chunk_size=8)[0] * weights).sum().backward()
    grad_parallel = inputs.grad.clone()
    inputs.grad = None
    (_reference_scan(inputs, 0.9)[0] * weights).sum().backward()
    torch.testing.assert_close(grad_parallel, inputs.grad, rtol=0, atol=1e-10)


def test_memory_module_equals_reference(tiny_config):
    config = tiny_config()
    torch.manual_seed(0)
    memory = ForgeEMAMemory(config, layer_idx=0).double()
    x = torch.randn(2, 30, config.hidden_size, dtype=torch.float64)
    u = memory.down_proj(x) * (1 - config.memory_decay)
    expected = memory.up_proj(_reference_scan(u, config.memory_decay)[0])
    torch.testing.assert_close(memory(x, memory_mask=None), expected, rtol=0, atol=1e-10)


def test_memory_resets_between_sequences_of_a_batch_and_between_batches(tiny_config):
    model = _model(tiny_config()).eval()
    batch = torch.randint(0, 97, (3, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        together = model(batch).logits
        alone = torch.cat([model(row[None]).logits for row in batch])
        other = model(torch.randint(0, 97, (3, 33))).logits  # an unrelated batch in between
        again = model(batch).logits
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, together, rtol=0, atol=0)
    assert (other - together).abs().max() > 1e-3


def test_left_padding_leaves_real_positions_unchanged(tiny_config):
    """A left-padded row (mask + position ids as `generate` builds them) gives the same logits as the bare row."""
    model = _model(tiny_config(pad_token_id=0)).eval()
    row = torch.randint(1, 97, (1, 21), generator=torch.Generator().manual_seed(6))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 21, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        bare = model(row).logits
        with_pad = model(padded, attention_mask=mask, position_ids=positions).logits[:, 6:]
    torch.testing.assert_close(with_pad, bare, rtol=0, atol=1e-5)
