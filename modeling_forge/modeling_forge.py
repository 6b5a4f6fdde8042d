"""PyTorch TRM x Titans-MAG ("forge") language model.

Each decoder layer mixes two branches over the same normed input through a learned gate (Titans, "memory as
gate"): causal sliding-window attention `y` and a long-term memory `m`; the output `g*y + (1-g)*m` is followed by
a SwiGLU feed-forward block. On top of the backbone features `h`, one small block (causal sliding-window attention
over the refined states plus a SwiGLU) refines an answer state `y` and a latent `z` recursively (TRM), every step is
supervised (deep supervision), and an ACT head learns when a position can stop (its answer is already right, or no
later step helps), so a position stops refining by masking (its state is frozen and later steps still read it), in
training too unless `act_halting_in_training` is off.

References:
    - Behrouz, Zhong, Mirrokni. "Titans: Learning to Memorize at Test Time", 2024 (MAG variant, linear memory).
    - Yang, Kautz, Hatamizadeh. "Gated Delta Networks: Improving Mamba2 with Delta Rule", 2024 (the memory's update
      rule and its chunked form); Yang et al. "Parallelizing Linear Transformers with the Delta Rule", 2024 (WY/UT).
    - Jolicoeur-Martineau. "Less is More: Recursive Reasoning with Tiny Networks", 2025 (TRM).
    - Graves. "Adaptive Computation Time for Recurrent Neural Networks", 2016 (ACT); Wang et al. "Hierarchical
      Reasoning Model", 2025 (the Q-head halting target and exploration TRM keeps).
    - Su et al. "RoFormer", 2021 (rotary embeddings); Shazeer. "GLU Variants Improve Transformer", 2020 (SwiGLU).

Shape legend:
    B batch, T query length, S key length (cached + new), H heads, Dh head size, D hidden size, M memory size,
    G gate hidden size, V vocabulary, K = trm_max_steps + 1 supervised answer states y_0..y_T, L layers.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_mask
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_flash_linear_attention_available, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .bitnet import BitLinear, QuantizedEmbedding, apply_bitnet_layout
from .configuration_forge import ForgeConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Helpers: norm, rotary embeddings, SwiGLU
# ----------------------------------------------------------------------------------------------------------------


class ForgeRMSNorm(nn.Module):
    """Root-mean-square layer norm (computed in fp32)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.normed_and_mean_square(hidden_states)[0]

    def normed_and_mean_square(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normed states and the fp32 mean square (..., 1) they were divided by (for callers that need both)."""
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype), variance


class ForgeRotaryEmbedding(nn.Module):
    """Rotary position embeddings; cos/sin for the given position ids."""

    def __init__(self, config: ForgeConfig) -> None:
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: ForgeConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys (B, H, T, Dh) by the (B, T, Dh) cos/sin of their positions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class ForgeMLP(nn.Module):
    """SwiGLU block: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------------------------
# Attention: causal sliding window, any transformers attention backend (sdpa by default)
# ----------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, H, Dh)
    return attn_output, attn_weights


def _allowed_keys(
    attention_mask: torch.Tensor | BlockMask | None, q_len: int, kv_len: int, window: int, device: torch.device
) -> torch.Tensor:
    """Boolean (B|1, 1, T, S) mask of the key positions each query may attend to, whatever form the mask came in:
    a 4D boolean or additive mask (eager, sdpa), a flex-attention `BlockMask`, a 2D padding mask or None (flash
    attention, or sdpa's plain-causal fast path)."""
    if isinstance(attention_mask, BlockMask):  # its mask_mod holds the offsets, window and padding: evaluate it
        batch = attention_mask.kv_num_blocks.shape[0]
        return create_mask(attention_mask.mask_mod, batch, 1, q_len, kv_len, device=device)
    if attention_mask is None or attention_mask.ndim == 2:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        allowed = ((k_pos <= q_pos) & (q_pos - k_pos < window))[None, None]
        if attention_mask is not None:  # (B, S') padding mask: its last S entries cover these keys
            allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
        return allowed
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


class ForgeAttention(nn.Module):
    """Multi-head causal sliding-window attention with rotary embeddings."""

    def __init__(self, config: ForgeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.sliding_window = config.sliding_window
        self.is_causal = True
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        output_attention_logit_max: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns the output (B, T, D), the attention weights (B, H, T, S) where the backend computes them (eager;
        recorded as `attentions` when `output_attentions=True`), and the per-head max logit (H,) when asked."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, Dh)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # (B, H, S, Dh): window-1 cached + new

        logit_max = None
        if output_attention_logit_max:  # for QK-clip: the largest pre-softmax logit per head over allowed pairs
            logit_max = self._logit_max(query, key, attention_mask)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights, logit_max

    @torch.no_grad()
    def _logit_max(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, chunk: int = 256
    ) -> torch.Tensor:
        """(H,) max of q.k*scale over allowed pairs, computed over query chunks so memory stays O(B*H*chunk*S)."""
        q_len, kv_len = query.shape[2], key.shape[2]
        allowed = _allowed_keys(attention_mask, q_len, kv_len, self.sliding_window, key.device)  # (B|1, 1, T, S)
        best = torch.full((query.shape[1],), float("-inf"), device=query.device, dtype=query.dtype)
        for start in range(0, q_len, chunk):
            scores = torch.matmul(query[:, :, start : start + chunk], key.transpose(2, 3)) * self.scaling
            scores = scores.masked_fill(~allowed[:, :, start : start + chunk], float("-inf"))
            best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
        return best


# ----------------------------------------------------------------------------------------------------------------
# Long-term memory: Titans' neural (linear) memory as a gated delta rule, and the EMA ablation. Both run a chunked
# parallel form for training and prefill, the recurrence for decoding, keep their state in fp32 in the cache, and
# restart at every document start of a padding-free packed batch (`segments`: document index per position).
# ----------------------------------------------------------------------------------------------------------------


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs (bf16 rounds a 0.999 decay to 1.0), float64 kept for exactness tests."""
    return torch.promote_types(dtype, torch.float32)


def ema_scan(
    inputs: torch.Tensor,
    decay: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All states of `m_t = decay * m_{t-1} + inputs_t` at once, in fp32 (or float64) whatever the input dtype.

    Chunked form: inside each chunk of C positions a lower-triangular (C, C) matrix of decay powers gives the local
    sums; the chunk-end states are carried across the n chunks by a short loop over chunks. Cost O(T*C*M), exact in
    float64 against the per-position loop.

    Args:
        inputs: (B, T, M) already-scaled inputs `(1 - decay) * W_down x_t` (zeros where masked).
        decay: scalar in (0, 1).
        initial_state: (B, M) state before the first position, or None for zeros.
        chunk_size: C.
        segments: (B, T) document index per position (non-decreasing; the state restarts where it changes, and the
            initial state belongs to document 0), or None for one document per row.

    Returns:
        states (B, T, M) and the final state (B, M), both in the state dtype.
    """
    dtype = _state_dtype(inputs.dtype)
    inputs = inputs.to(dtype)
    batch, length, width = inputs.shape
    if initial_state is not None:
        initial_state = initial_state.to(dtype)
    if length == 1 and segments is None:  # a decoding step: the recurrence itself
        state = inputs[:, 0] if initial_state is None else decay * initial_state + inputs[:, 0]
        return state[:, None], state
    chunk = max(1, min(chunk_size, length))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    x = F.pad(inputs, (0, 0, 0, pad)).view(batch, n_chunks, chunk, width)  # (B, n, C, M)
    idx = torch.arange(chunk, device=inputs.device)
    rel = idx[:, None] - idx[None, :]
    intra = torch.where(rel >= 0, decay ** rel.clamp(min=0).to(dtype), torch.zeros((), dtype=dtype))  # (C, C)
    into_chunk = decay ** (idx + 1).to(dtype)  # (C,) decay from the chunk's entry state to each position
    if segments is not None:
        seg = torch.cat([segments, segments[:, -1:].expand(batch, pad)], 1).view(batch, n_chunks, chunk)
        seg_prev = torch.cat([torch.zeros_like(seg[:, :1, 0]), seg[:, :-1, -1]], 1)  # (B, n) document entering
        intra = intra * (seg[..., :, None] == seg[..., None, :]).to(dtype)  # (B, n, C, C)
        connected = (seg == seg_prev[..., None]).to(dtype)  # (B, n, C) still in the entering document
        into = into_chunk * connected
    else:
        into = into_chunk.expand(batch, n_chunks, chunk)
    local = torch.matmul(intra, x)  # (B, n, C, M): sums within each chunk
    carry = torch.zeros(batch, width, dtype=dtype, device=inputs.device) if initial_state is None else initial_state
    states = []
    for local_c, into_c in zip(local.unbind(1), into.unbind(1), strict=True):  # n = T / C updates of (B, C, M)
        states.append(local_c + into_c[..., None] * carry[:, None])
        carry = states[-1][:, -1]
    states = torch.stack(states, 1).reshape(batch, n_chunks * chunk, width)[:, :length]
    return states, states[:, -1]


class ForgeEMAMemory(nn.Module):
    """Long-term memory `m_t = decay*m_{t-1} + (1-decay)*W_down x_t`, read out as `W_up m_t` (the ablation: no content
    addressing).

    Causal by construction; the state starts at zero for every sequence and document (padding contributes nothing),
    is kept in fp32 and is carried between generation steps in the cache's recurrent-state slot of this layer.
    """

    def __init__(self, config: ForgeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config  # `memory_decay` and `memory_chunk_size` are read live, as every other field
        self.down_proj = nn.Linear(config.hidden_size, config.memory_size, bias=False)
        self.up_proj = nn.Linear(config.memory_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        decay = self.config.memory_decay
        inputs = self.down_proj(hidden_states).to(_state_dtype(hidden_states.dtype)) * (1.0 - decay)  # (B, T, M) fp32
        if memory_mask is not None:
            inputs = inputs * memory_mask[..., None].to(inputs.dtype)
        initial_state = past_key_values.get_recurrent_state(self.layer_idx) if past_key_values is not None else None
        states, final_state = ema_scan(inputs, decay, initial_state, self.config.memory_chunk_size, segments)
        if past_key_values is not None:
            past_key_values.update_recurrent_state(final_state, self.layer_idx)
            # `update_recurrent_state` leaves the flag to the conv-state path, which this memory does not use.
            past_key_values.layers[self.layer_idx].has_previous_state[0] = True
        return self.up_proj(states.to(hidden_states.dtype))


def gated_delta_rule_recurrent(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token (decoding, and the reference the chunked form is tested against).

    `S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T`, `o_t = S_t^T q_t`, with `a_t = exp(g_t)`: one gradient
    step of size `b_t` on `||S^T k_t - v_t||^2` after forgetting (Titans' memory update, linear memory).

    Args:
        query, key: (B, H, T, Dk); value: (B, H, T, Dv); g (log forgetting, <= 0), beta (step size): (B, H, T).
        initial_state: (B, H, Dk, Dv) or None for zeros.
        segments: (B, T) document index per position (see `ema_scan`), or None.

    Returns:
        outputs (B, H, T, Dv) and the final state (B, H, Dk, Dv), in fp32 (float64 for float64 inputs).
    """
    dtype = _state_dtype(query.dtype)
    query, key, value, g, beta = (x.to(dtype) for x in (query, key, value, g, beta))
    batch, heads, length, _ = key.shape
    state = (
        torch.zeros(batch, heads, key.shape[-1], value.shape[-1], dtype=dtype, device=key.device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    outputs = []
    if segments is not None:
        starts = (segments != F.pad(segments, (1, 0))[:, :-1]).to(dtype)  # (B, T) 1 where a document starts
    per_token = zip(*(x.unbind(2) for x in (query, key, value, g, beta)), strict=True)  # unbind: O(T) backward
    for t, (q_t, k_t, v_t, g_t, beta_t) in enumerate(per_token):
        if segments is not None:
            state = state * (1.0 - starts[:, t, None, None, None])
        state = state * g_t.exp()[..., None, None]
        delta = beta_t[..., None] * (v_t - (state * k_t[..., :, None]).sum(-2))  # (B, H, Dv)
        state = state + k_t[..., :, None] * delta[..., None, :]
        outputs.append((state * q_t[..., :, None]).sum(-2))
    return torch.stack(outputs, 2), state


def gated_delta_rule_chunked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule in the chunked WY/UT form, equal to `gated_delta_rule_recurrent` (same arguments).

    Inside a chunk of C positions, the C delta-rule updates fold into one unit-lower-triangular solve
    (`(I + tril(diag(b) K K^T * Gamma, -1))^-1`, the UT transform of DeltaNet); across the n chunks a short loop
    carries the (Dk, Dv) chunk states. Hand-written because transformers keeps its copy
    (`torch_chunk_gated_delta_rule`, models/qwen3_next) model-private and without document resets; the algorithm
    follows it and fla's `naive.py`. Computed in fp32 whatever the input dtype. Keys must be L2-normalised (an
    unnormalised `b k^T k` above 2 makes the solve blow up, fla issues #99, #537).
    """
    dtype = _state_dtype(query.dtype)
    query, key, value, g, beta = (x.to(dtype) for x in (query, key, value, g, beta))
    batch, heads, length, d_k = key.shape
    d_v = value.shape[-1]
    chunk = max(1, min(chunk_size, length))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    query, key, value = (F.pad(x, (0, 0, 0, pad)).view(batch, heads, n_chunks, chunk, -1) for x in (query, key, value))
    g, beta = (F.pad(x, (0, pad)).view(batch, heads, n_chunks, chunk) for x in (g, beta))  # pad: no write, no decay

    cum = g.cumsum(-1)  # (B, H, n, C) log-decay from the chunk start
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=key.device).tril()
    if segments is not None:
        seg = torch.cat([segments, segments[:, -1:].expand(batch, pad)], 1).view(batch, 1, n_chunks, chunk)
        seg_prev = torch.cat([torch.zeros_like(seg[..., :1, 0]), seg[..., :-1, -1]], -1)  # (B, 1, n) entering doc
        same_doc = causal & (seg[..., :, None] == seg[..., None, :])  # (B, 1, n, C, C)
        from_start = (seg == seg_prev[..., None]).to(dtype)  # (B, 1, n, C): reads/updates the entering state
        to_end = (seg == seg[..., -1:]).to(dtype)  # (B, 1, n, C): reaches the chunk-end state
    else:
        same_doc, from_start, to_end = causal, 1.0, 1.0
    # in place on the fresh difference: two fewer (B, H, n, C, C) tensors (the largest ones here)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~same_doc, float("-inf")).exp_()  # (B, H, n, C, C)

    k_beta = key * beta[..., None]
    system = (k_beta @ key.transpose(-1, -2)) * decay  # its strictly lower part defines the UT system
    start_decay = cum.exp() * from_start  # (B, H, n, C)
    rhs = torch.cat([value * beta[..., None], k_beta * start_decay[..., None]], -1)  # one solve for both
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    new_values, k_cumdecay = solved.split([d_v, d_k], -1)  # split, not slicing: no zero-filled gradient per slice
    intra = (query @ key.transpose(-1, -2)) * decay  # (B, H, n, C, C)
    query_in = query * start_decay[..., None]
    key_out = key * ((cum[..., -1:] - cum).exp() * to_end)[..., None]
    chunk_decay = cum[..., -1].exp() * (from_start[..., -1] if segments is not None else 1.0)  # (B, H, n)

    state = (
        torch.zeros(batch, heads, d_k, d_v, dtype=dtype, device=key.device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    outputs = []
    # unbind, not [:, :, c]: the backward of indexing in a loop would fill a full-size zero tensor per chunk
    per_chunk = (x.unbind(2) for x in (new_values, k_cumdecay, query_in, intra, key_out, chunk_decay))
    for values_c, k_cumdecay_c, query_c, intra_c, key_c, decay_c in zip(*per_chunk, strict=True):
        corrected = values_c - k_cumdecay_c @ state  # (B, H, C, Dv): what S does not yet predict
        outputs.append(query_c @ state + intra_c @ corrected)
        state = state * decay_c[..., None, None] + key_c.transpose(-1, -2) @ corrected
    out = torch.stack(outputs, 2).reshape(batch, heads, n_chunks * chunk, d_v)[:, :, :length]
    return out, state


def _fla_chunk_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-linear-attention's Triton kernel (CUDA only, optional extra `agent-forge[gpu]`); same maths as
    `gated_delta_rule_chunked` without document resets. Imported lazily so CPU code never touches it."""
    if is_flash_linear_attention_available():  # also tells transformers' remote-code import check it is optional
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    else:
        raise ImportError("flash-linear-attention is not installed. Fix: pip install 'agent-forge[gpu]'.")
    out, state = chunk_gated_delta_rule(
        q=query.transpose(1, 2).contiguous(),  # fla takes (B, T, H, D)
        k=key.transpose(1, 2).contiguous(),
        v=value.transpose(1, 2).contiguous(),
        g=g.float().transpose(1, 2).contiguous(),
        beta=beta.transpose(1, 2).contiguous(),
        scale=1.0,
        initial_state=initial_state.float() if initial_state is not None else None,
        output_final_state=True,
    )
    return out.transpose(1, 2), state


def titans_momentum_recurrent(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    segments: torch.Tensor | None = None,
    chunk_size: int = 64,
    offset: int = 0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Titans' linear memory with momentum in the mini-batch form, token by token (the reference of the chunked form,
    and the decoding step).

    At each chunk start (every `chunk_size` positions) the memory `S` is frozen as the gradient point `G`; then per
    token `G <- a_t G`, `Z_t = eta_t Z_{t-1} + b_t k_t (v_t - G^T k_t)^T` (the negative gradient of
    `||G^T k_t - v_t||^2 / 2` taken at the chunk-start memory, forgotten to t: Titans §3.2), `S_t = a_t S_{t-1} + Z_t`,
    `o_t = S_t^T q_t`. With `chunk_size=1` and `eta = 0` this is exactly the gated delta rule.

    Args:
        as `gated_delta_rule_recurrent`, plus eta (B, H, T) momentum in [0, 1] and chunk_size; the momentum restarts
        with `S` at every document start.
        initial_state: the carried `(S, Z, G)`, each (B, H, Dk, Dv), or None for zeros.
        offset: positions of the current chunk already consumed before the first input (0: it starts a chunk).

    Returns:
        outputs (B, H, T, Dv) and the final `(S, Z, G)`, in fp32 (float64 for float64 inputs).
    """
    dtype = _state_dtype(query.dtype)
    query, key, value, g, beta, eta = (x.to(dtype) for x in (query, key, value, g, beta, eta))
    batch, heads, length, d_k = key.shape
    if initial_state is None:
        state = torch.zeros(batch, heads, d_k, value.shape[-1], dtype=dtype, device=key.device)
        momentum, point = torch.zeros_like(state), state
    else:
        state, momentum, point = (x.to(dtype) for x in initial_state)
    starts = None if segments is None else (segments != F.pad(segments, (1, 0))[:, :-1]).to(dtype)
    outputs = []
    per_token = zip(*(x.unbind(2) for x in (query, key, value, g, beta, eta)), strict=True)
    for t, (q_t, k_t, v_t, g_t, beta_t, eta_t) in enumerate(per_token):
        if (t + offset) % chunk_size == 0:
            point = state
        if starts is not None:
            keep = 1.0 - starts[:, t, None, None, None]
            state, momentum, point = state * keep, momentum * keep, point * keep
        decay = g_t.exp()[..., None, None]
        point = point * decay
        residual = beta_t[..., None] * (v_t - (point * k_t[..., :, None]).sum(-2))  # (B, H, Dv)
        momentum = eta_t[..., None, None] * momentum + k_t[..., :, None] * residual[..., None, :]
        state = state * decay + momentum
        outputs.append((state * q_t[..., :, None]).sum(-2))
    return torch.stack(outputs, 2), (state, momentum, point)


def titans_momentum_chunked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`titans_momentum_recurrent` in parallel within each chunk (same results; it starts at a chunk boundary with
    zero momentum, so `initial_state` is `S` alone, (B, H, Dk, Dv) or None).

    The gradients of a chunk are taken at its entering memory, so no solve is needed: with `D[t, s]` the forgetting
    from s to t and `E[t, s] = eta_{s+1} ... eta_t` the momentum's decay, the outputs of a chunk are
    `A q S_in + h q Z_in + ((Q K^T) * (D E)) R` with `R = b (V - A K S_in)` the chunk's write residuals; a short loop
    carries `S` and the momentum `Z` across chunks. `E` is a cumulative product (not exp of a log-sum), so
    `eta = 0` stays exact. Hand-written: neither transformers nor fla ships this form.
    """
    dtype = _state_dtype(query.dtype)
    query, key, value, g, beta, eta = (x.to(dtype) for x in (query, key, value, g, beta, eta))
    batch, heads, length, d_k = key.shape
    d_v = value.shape[-1]
    if segments is not None:  # the momentum restarts at a document start: eta = 0 there (S restarts through D, A)
        starts = segments != F.pad(segments, (1, 0))[:, :-1]
        eta = eta.masked_fill(starts[:, None], 0.0)
    chunk = max(1, min(chunk_size, length))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    query, key, value = (F.pad(x, (0, 0, 0, pad)).view(batch, heads, n_chunks, chunk, -1) for x in (query, key, value))
    g, beta, eta = (F.pad(x, (0, pad)).view(batch, heads, n_chunks, chunk) for x in (g, beta, eta))

    cum = g.cumsum(-1)  # (B, H, n, C)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=key.device).tril()
    if segments is not None:
        seg = torch.cat([segments, segments[:, -1:].expand(batch, pad)], 1).view(batch, 1, n_chunks, chunk)
        seg_prev = torch.cat([torch.zeros_like(seg[..., :1, 0]), seg[..., :-1, -1]], -1)
        same_doc = causal & (seg[..., :, None] == seg[..., None, :])
        from_start = (seg == seg_prev[..., None]).to(dtype)
    else:
        same_doc, from_start = causal, 1.0
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~same_doc, float("-inf")).exp_()  # D (B,H,n,C,C)
    # E[t, s] = prod_{s < r <= t} eta_r: row s of `rows` holds eta_r for r > s and 1 elsewhere; cumprod along r.
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=key.device).triu(1)  # [s, r]: r > s
    rows = torch.where(later, eta[..., None, :], torch.ones((), dtype=dtype, device=key.device))
    eta_decay = (rows.cumprod(-1).transpose(-1, -2) * causal).to(dtype)  # E (B, H, n, C, C), [t, s]
    into = eta.cumprod(-1)  # (B, H, n, C): momentum entering the chunk, carried to t
    write = decay @ eta_decay  # F = D E
    carry_z = (decay @ into[..., None])[..., 0]  # h = D P
    start_decay = cum.exp() * from_start  # A
    weights = (query @ key.transpose(-1, -2)) * write
    query_state, query_z = query * start_decay[..., None], query * carry_z[..., None]

    state = torch.zeros(batch, heads, d_k, d_v, dtype=dtype, device=key.device)
    state = state if initial_state is None else initial_state.to(dtype)
    momentum = torch.zeros_like(state)
    outputs = []
    per_chunk = (
        x.unbind(2)
        for x in (query_state, query_z, weights, key, value, beta, start_decay, write, eta_decay, carry_z, into)
    )
    for c, (q_s, q_z, w, k, v, b, a, write_c, eta_c, h, p) in enumerate(zip(*per_chunk, strict=True)):
        end = chunk - 1 - (pad if c == n_chunks - 1 else 0)  # the last real position of the chunk
        residual = b[..., None] * (v - a[..., None] * (k @ state))  # (B, H, C, Dv): R
        outputs.append(q_s @ state + q_z @ momentum + w @ residual)
        point = a[..., end, None, None] * state  # the gradient point, forgotten to `end` (carried for decoding)
        new_state = point + h[..., end, None, None] * momentum
        state = new_state + k.transpose(-1, -2) @ (write_c[..., end, :, None] * residual)
        momentum = p[..., end, None, None] * momentum + k.transpose(-1, -2) @ (eta_c[..., end, :, None] * residual)
    out = torch.stack(outputs, 2).reshape(batch, heads, n_chunks * chunk, d_v)[:, :, :length]
    return out, (state, momentum, point)


def deep_memory_apply(weights: tuple[torch.Tensor, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """The deep memory `M(x) = SiLU(x W1) W2` per batch row and head: weights (B, H, Dk, E), (B, H, E, Dv);
    inputs (B, H, C, Dk) -> (B, H, C, Dv)."""
    return F.silu(inputs @ weights[0]) @ weights[1]


def _deep_memory_loss(
    weights: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Sum over rows, heads and tokens of `b_t ||M(k_t) - v_t||^2 / 2`; rows and heads do not share weights, so its
    gradient holds each (row, head)'s own per-chunk gradient."""
    return (beta[..., None] * (deep_memory_apply(weights, key) - value).square()).sum() / 2


def deep_memory_chunked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor | None,
    initial_weights: tuple[torch.Tensor, torch.Tensor],
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Titans' deep memory in the mini-batch form: per chunk c, the tokens read the weights entering the chunk,
    then `Z_c = eta_c Z_{c-1} - sum_t b_t grad_t` (gradients at those weights, via `torch.func.grad`) and
    `W_c = a_c W_{c-1} + Z_c`, with `a_c` the chunk's total forgetting `exp(sum g)` and `eta_c` its mean momentum
    (no momentum: `eta = None`). Sequential over chunks, parallel within one, differentiable end to end.

    Args:
        query, key: (B, H, T, Dk); value: (B, H, T, Dv); g, beta, eta: (B, H, T).
        initial_weights: W1 (H, Dk, E) and W2 (H, E, Dv), learned (Titans' meta-learned initial memory).
        chunk_size: tokens per gradient step.

    Returns:
        outputs (B, H, T, Dv) and the final weights, each (B, H, ...), in fp32 (float64 for float64 inputs).
    """
    dtype = _state_dtype(query.dtype)
    batch, heads, length, _ = key.shape
    weights = tuple(w.to(dtype)[None].expand(batch, *w.shape) for w in initial_weights)
    momentum = None
    grad_fn = torch.func.grad(_deep_memory_loss)
    outputs = []
    for start in range(0, length, chunk_size):
        piece = slice(start, start + chunk_size)
        q, k, v = (x[:, :, piece].to(dtype) for x in (query, key, value))
        outputs.append(deep_memory_apply(weights, q))
        grads = grad_fn(weights, k, v, beta[:, :, piece].to(dtype))
        forget = g[:, :, piece].to(dtype).sum(-1).exp()[..., None, None]  # (B, H, 1, 1)
        if eta is None:
            weights = tuple(forget * w - dw for w, dw in zip(weights, grads, strict=True))
            continue
        keep = eta[:, :, piece].to(dtype).mean(-1)[..., None, None]
        if momentum is None:
            momentum = tuple(-dw for dw in grads)
        else:
            momentum = tuple(keep * z - dw for z, dw in zip(momentum, grads, strict=True))
        weights = tuple(forget * w + z for w, z in zip(weights, momentum, strict=True))
    return torch.cat(outputs, 2), weights


def short_causal_conv(
    inputs: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None, segments: torch.Tensor | None
) -> torch.Tensor:
    """Depthwise causal convolution `out_t = sum_j weight[:, K-1-j] * x_{t-j}` (nn.Conv1d's tap order).

    Computed as K shifted multiply-adds in the (B, T, C) layout the projections produce and the heads read: no
    transposes, and its SiLU and L2-norm neighbours stay contiguous (about 15% faster forward and backward on CPU than
    a `conv1d` on the transposed input).

    Args:
        inputs: (B, T, C) new inputs; weight: (C, K); tail: (B, C, K-1) inputs before these (the cache's conv-state
            layout) or None (zeros).
        segments: (B, T) document index per position, or None; taps never reach into an earlier document.

    Returns:
        (B, T, C), in the promoted dtype of inputs and weight.
    """
    taps = weight.shape[-1]
    length = inputs.shape[1]
    dtype = torch.promote_types(inputs.dtype, weight.dtype)
    inputs = inputs.to(dtype)
    if tail is None:
        full = F.pad(inputs, (0, 0, taps - 1, 0))
    else:
        full = torch.cat([tail.transpose(1, 2).to(dtype), inputs], 1)[:, -(taps - 1 + length) :]
        full = F.pad(full, (0, 0, taps - 1 + length - full.shape[1], 0))
    taps_weight = weight.t().to(dtype)  # (K, C)
    seg_full = F.pad(segments, (taps - 1, 0)) if segments is not None else None  # the tail belongs to document 0
    out = inputs * taps_weight[taps - 1]
    for lag in range(1, taps):
        piece = full[:, taps - 1 - lag : taps - 1 - lag + length]
        if seg_full is not None:
            same_doc = seg_full[:, taps - 1 - lag : taps - 1 - lag + length] == segments  # (B, T)
            piece = piece * same_doc[..., None].to(dtype)
        out = torch.addcmul(out, piece, taps_weight[taps - 1 - lag])
    return out


class ForgeNeuralMemory(nn.Module):
    """Titans' long-term memory, linear form: per head a matrix `S` written at every token by one gradient step on
    the associative loss `||S^T k_t - v_t||^2` with a data-dependent step size `b_t = sigmoid(W_b x_t)` (Titans'
    theta_t) after forgetting `a_t = exp(-exp(A_log) * softplus(W_a x_t + dt_bias))` (Titans' alpha_t), read as
    `o_t = S_t^T q_t`: the gated delta rule (Yang et al., "Gated Delta Networks", 2024). q, k, v pass a short causal
    depthwise conv and SiLU; q, k are L2-normalised; the output is RMS-normed per head, gated by `SiLU(W_g x)` and
    projected back to the model width.

    The memory keeps writing as it reads at inference too (Titans' test-time memorisation). Its state `S` (fp32)
    and the conv tail live in the cache's recurrent/conv slots of this layer; a padded position writes nothing and
    every document of a packed batch starts from an empty memory.

    Titans' options, off by default: `memory_momentum` (surprise with momentum `eta_t`, `titans_momentum_chunked`)
    and `memory_deep` (a 2-layer MLP memory per head, `deep_memory_chunked`). Both take their gradients at the memory
    entering each chunk of `memory_chunk_size` tokens (Titans' mini-batch form), so the chunk grid, counted from a
    sequence's first position (left padding included), is part of the model. With momentum the cache's recurrent
    slot holds `(S, Z, G)` side by side (memory, momentum, chunk-start gradient point) and the cache layer its
    position in the chunk grid (`forge_chunk_offset`); decoding runs the per-token recurrence, exactly equal to the
    chunked prefill. The deep memory fills a cache at prefill but refuses to continue from one (use_cache=False).
    """

    def __init__(self, config: ForgeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        self.num_heads = config.memory_num_heads or config.num_attention_heads
        self.head_dim = config.memory_size // self.num_heads
        self.conv_size = config.memory_conv_size
        width = config.memory_size
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)  # step size (write strength)
        self.a_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)  # forgetting
        self.g_proj = nn.Linear(config.hidden_size, width, bias=False)  # output gate
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * width, self.conv_size))  # depthwise taps for [q; k; v]
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.out_norm = ForgeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if config.memory_momentum:
            self.eta_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)  # momentum, ~0.5 at init
        if config.memory_deep:  # the deep memory's initial weights, learned (Titans: meta-learned initial memory)
            hidden = config.memory_deep_expansion * self.head_dim
            self.deep_w1 = nn.Parameter(torch.empty(self.num_heads, self.head_dim, hidden))
            self.deep_w2 = nn.Parameter(torch.empty(self.num_heads, hidden, self.head_dim))

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        """Conv taps as nn.Conv1d's default; A = 1; softplus(dt_bias) log-uniform in [dt_min, dt_max] (Mamba2's dt
        initialisation): the memory starts forgetting slowly, which the recall benchmark needs to learn at all."""
        bound = self.conv_size**-0.5
        init.uniform_(self.conv_weight, -bound, bound)
        init.zeros_(self.A_log)
        low, high = math.log(self.config.memory_dt_min), math.log(self.config.memory_dt_max)
        dt = torch.exp(torch.rand(self.num_heads, device=self.dt_bias.device) * (high - low) + low)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        if self.config.memory_deep:  # fan-in scaled, so M(k) starts at the scale of the values
            init.normal_(self.deep_w1, std=self.deep_w1.shape[1] ** -0.5)
            init.normal_(self.deep_w2, std=self.deep_w2.shape[1] ** -0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        dtype = _state_dtype(hidden_states.dtype)  # fp32 (float64 kept) for the rates and the state
        qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        beta = torch.sigmoid(self.b_proj(hidden_states).to(dtype))  # (B, T, H)
        g = -self.A_log.to(dtype).exp() * F.softplus(self.a_proj(hidden_states).to(dtype) + self.dt_bias.to(dtype))
        g = g * self.config.memory_forget_scale  # (B, T, H) log forgetting, <= 0
        eta = torch.sigmoid(self.eta_proj(hidden_states).to(dtype)) if self.config.memory_momentum else None
        if memory_mask is not None:  # a padded position reads zeros, writes nothing and forgets nothing
            keep = memory_mask[..., None]
            qkv, beta, g = qkv * keep.to(qkv.dtype), beta * keep.to(dtype), g * keep.to(dtype)
            eta = eta * keep.to(dtype) if eta is not None else None  # and passes no momentum on
        initial_state, tail = None, None
        if past_key_values is not None:
            initial_state = past_key_values.get_recurrent_state(self.layer_idx)
            if self.config.memory_deep and initial_state is not None:
                raise ValueError(
                    "ForgeConfig.memory_deep: cached decoding cannot continue from a cache (the deep memory's "
                    "momentum and the inputs of its unfinished chunk are not carried, so cached != uncached). "
                    "Fix: generate(..., use_cache=False), or set memory_deep=False."
                )
            tail = past_key_values.get_conv_state(self.layer_idx)
            tail = tail.clone() if tail is not None else None  # the update below overwrites the cached tensor
            past_key_values.update_conv_state(qkv.transpose(1, 2), self.layer_idx, conv_kernel_size=self.conv_size - 1)
        qkv = F.silu(short_causal_conv(qkv, self.conv_weight, tail, segments))  # (B, T, 3W)
        heads = (batch, length, self.num_heads, self.head_dim)
        query, key, value = (x.reshape(heads).transpose(1, 2) for x in qkv.split(self.config.memory_size, -1))
        query = F.normalize(query.to(dtype), dim=-1, eps=1e-6)  # (B, H, T, Dk)
        key = F.normalize(key.to(dtype), dim=-1, eps=1e-6)
        beta, g = beta.transpose(1, 2), g.transpose(1, 2)  # (B, H, T)
        chunk = self.config.memory_chunk_size
        if self.config.memory_deep:
            if segments is not None:
                raise ValueError(
                    "ForgeConfig.memory_deep does not support padding-free packed batches (its weights change once "
                    "per chunk, not at document starts). Fix: pad the batch with an attention_mask, or set "
                    "memory_deep=False."
                )
            eta = eta.transpose(1, 2) if eta is not None else None
            out, weights = deep_memory_chunked(query, key, value, g, beta, eta, (self.deep_w1, self.deep_w2), chunk)
            state = torch.cat([w.flatten(2) for w in weights], -1)  # (B, H, ...): kept in the cache for inspection
        elif self.config.memory_momentum:  # cache: (S, Z, G) side by side, and the position in the chunk grid
            if initial_state is None:
                offset = 0
                out, carry = titans_momentum_chunked(
                    query, key, value, g, beta, eta.transpose(1, 2), None, segments, chunk
                )
            else:  # continuing (decoding): the recurrence from the carried state, exact
                offset = past_key_values.layers[self.layer_idx].forge_chunk_offset
                carried = initial_state.chunk(3, -1)
                out, carry = titans_momentum_recurrent(
                    query, key, value, g, beta, eta.transpose(1, 2), carried, segments, chunk, offset
                )
            state = torch.cat(carry, -1)  # (B, H, Dk, 3 Dv)
            if past_key_values is not None:
                past_key_values.layers[self.layer_idx].forge_chunk_offset = (offset + length) % chunk
        elif length == 1 and segments is None:
            out, state = gated_delta_rule_recurrent(query, key, value, g, beta, initial_state)
        elif hidden_states.is_cuda and segments is None and is_flash_linear_attention_available():
            out, state = _fla_chunk_gated_delta_rule(query, key, value.to(dtype), g, beta, initial_state)
        else:
            out, state = gated_delta_rule_chunked(query, key, value, g, beta, initial_state, segments, chunk)
        if past_key_values is not None:
            past_key_values.update_recurrent_state(state, self.layer_idx)
        out = self.out_norm(out.transpose(1, 2).to(hidden_states.dtype))  # (B, T, H, Dv)
        out = out.reshape(batch, length, -1) * F.silu(self.g_proj(hidden_states))
        return self.o_proj(out)


MEMORY_CLASSES = {"neural": ForgeNeuralMemory, "ema": ForgeEMAMemory}


# ----------------------------------------------------------------------------------------------------------------
# MAG gate and decoder layer
# ----------------------------------------------------------------------------------------------------------------


class ForgeMAGGate(nn.Module):
    """Titans §4.2 "memory as gate": the gate reads both branches RMS-normed (learnable weights), and per channel
    `g = sigmoid(MLP([norm y; norm m]))` mixes them as `g*y + (1-g)*m`. What `y` and `m` are is `config.mag_mix`: by
    default the raw attention and the normed memory rescaled per token to the attention's RMS (see the config)."""

    def __init__(self, config: ForgeConfig) -> None:
        super().__init__()
        self.config = config
        self.attn_norm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory_norm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.fc1 = nn.Linear(2 * config.hidden_size, config.gate_hidden_size)
        self.fc2 = nn.Linear(config.gate_hidden_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, attn: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mix (B, T, D), the gate `g` (B, T, D) and its Bernoulli entropy in nats (B, T, D), taken from the logit
        `a` as `softplus(a) - a * g`: exact, and no clamp near saturation."""
        normed_attn, attn_mean_square = self.attn_norm.normed_and_mean_square(attn)
        normed_memory = self.memory_norm(memory)
        logits = self.fc2(self.act_fn(self.fc1(torch.cat([normed_attn, normed_memory], dim=-1))))
        gate = torch.sigmoid(logits)
        mix = self.config.mag_mix
        if mix == "normed":
            attn, memory = normed_attn, normed_memory
        elif mix == "memory_at_attention_rms":  # the attention's RMS, from the mean square its norm already took
            memory = normed_memory * attn_mean_square.add(1e-12).sqrt().to(attn.dtype)
        entropy = F.softplus(logits) - logits * gate
        return memory + gate * (attn - memory), gate, entropy  # = g * attn + (1 - g) * memory


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-row mean (B,) of (B, T, D) values over the real tokens of a (B, T) mask (all tokens when None)."""
    if mask is None:
        return values.mean(dim=(1, 2))
    weights = mask[..., None].to(values.dtype)
    return (values * weights).sum(dim=(1, 2)) / (weights.sum(dim=(1, 2)) * values.shape[-1]).clamp(min=1.0)


class ForgeDecoderLayer(GradientCheckpointingLayer):
    """x + MAG(attn(norm x), memory(norm x)), then + SwiGLU(norm .)."""

    def __init__(self, config: ForgeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = ForgeAttention(config, layer_idx)
        has_memory = config.layer_has_memory(layer_idx)
        self.memory = MEMORY_CLASSES[config.memory_type](config, layer_idx) if has_memory else None
        self.gate = ForgeMAGGate(config) if has_memory else None
        self.mlp = ForgeMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        output_attention_logit_max: bool = False,
        memory_segments: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns the new hidden states (B, T, D), the gate mean and entropy per batch row over its real tokens (B,),
        and per-head max logits. `memory_segments` (B, T): document index per position under padding-free packing, or
        None."""
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        attn, _, logit_max = self.self_attn(
            normed, position_embeddings, attention_mask, past_key_values, output_attention_logit_max, **kwargs
        )
        gate_mean = gate_entropy = None
        if self.memory is not None:
            memory = self.memory(normed, memory_mask, past_key_values, memory_segments)
            attn, gate, entropy = self.gate(attn, memory)
            gate_mean = masked_mean(gate.detach(), memory_mask)  # (B,)
            gate_entropy = masked_mean(entropy, memory_mask)  # (B,)
        hidden_states = residual + attn
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, gate_mean, gate_entropy, logit_max


# ----------------------------------------------------------------------------------------------------------------
# TRM recursive refinement and ACT halting
# ----------------------------------------------------------------------------------------------------------------


def _refiner_cache_layer(template) -> object:
    """A new cache layer of the same kind (dynamic or static, sliding or full) as the backbone's first layer, so the
    refiner's keys have the backbone's key length and the backbone's attention mask applies to them unchanged."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

    if isinstance(template, StaticSlidingWindowLayer):
        return StaticSlidingWindowLayer(max_cache_len=template.max_cache_len, sliding_window=template.max_cache_len)
    if isinstance(template, StaticLayer):
        return StaticLayer(max_cache_len=template.max_cache_len)
    if isinstance(template, DynamicSlidingWindowLayer):
        return DynamicSlidingWindowLayer(sliding_window=template.sliding_window)
    return DynamicLayer()


class ForgeRefinerAttention(nn.Module):
    """Causal sliding-window self-attention over the refined states (TRM's self-attention block, causal here).

    Each application of the shared block (step t, cycle c, micro-step j) is its own cache slot, appended after the
    backbone's layers in the same `Cache`, so decoding attends to the earlier tokens' states of that same application.
    """

    def __init__(self, config: ForgeConfig) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.sliding_window = config.sliding_window
        self.is_causal = True
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def key_value(
        self, normed: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (B, H, T, Dh) of these states."""
        shape = (*normed.shape[:-1], -1, self.head_dim)
        key = self.k_proj(normed).view(shape).transpose(1, 2)
        value = self.v_proj(normed).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        key = (key * cos.unsqueeze(1)) + (rotate_half(key) * sin.unsqueeze(1))
        return key, value

    def forward(
        self,
        normed: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        slot: int,
    ) -> torch.Tensor:
        shape = (*normed.shape[:-1], -1, self.head_dim)
        query = self.q_proj(normed).view(shape).transpose(1, 2)  # (B, H, T, Dh)
        cos, sin = position_embeddings
        query = (query * cos.unsqueeze(1)) + (rotate_half(query) * sin.unsqueeze(1))
        key, value = self.key_value(normed, position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, slot)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
        )
        return self.o_proj(output.reshape(*normed.shape[:-1], -1).contiguous())


class ForgeRefiner(nn.Module):
    """TRM's tiny network, applied recursively on top of the backbone features `h`.

    `y_0 = h` (step 0 is the plain backbone LM). One cycle: `micro_steps` latent updates of `z` from `z + h + y`
    through a block of causal sliding-window attention over the refined states and a SwiGLU (TRM's transformer block,
    so a step can reason over the context), then an answer update of `y` from `y + z` through the same SwiGLU,
    position-wise (`y` sees the context through `z`). `trm_attention=False` drops the attention (the earlier
    position-wise refiner, kept as an ablation). Three block forms (`trm_norm`):

    - `"post"` (TRM's): each sublayer is `s <- RMSNorm(s + f(s))`, the latent update replaces `z` by the block's
      output and the answer update replaces `y`, so every state stays at unit scale. `z_0 = 0`; with the zero-started
      output projections an untrained refiner maps `h` to a positive multiple of `h`, which the output norm reads as
      `h`: every step starts as step 0.
    - `"post_latent"`: the latent update in the post-norm form (bounded `z`, `z_0 = 0`), the answer update residual
      as in `"pre"` (`y` starts as `h` and each step adds to it).
    - `"pre"` (the first design, the default for configs saved without the field): residual updates
      `z <- z + Block(z + h + y)` and `y <- y + SwiGLU(RMSNorm(y + z))`, `z_0 = P_z h`. On the depth probe its
      attention's output grew without bound (root mean square 9 at the answers after 800 steps, with `h` at 1) while
      the shared SwiGLU, the only path from `z` to `y`, fell to 0.001: the recursion changed no answer.
    """

    def __init__(self, config: ForgeConfig) -> None:
        super().__init__()
        self.post_norm = config.trm_norm in ("post", "post_latent")  # the latent update's form
        self.post_norm_answer = config.trm_norm == "post"  # the answer update's form
        self.z_init = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.attn_norm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = ForgeRefinerAttention(config) if config.trm_attention else None
        self.mlp_norm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.y_norm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.block = ForgeMLP(config.hidden_size, config.trm_intermediate_size, config.hidden_act)
        self.block.down_proj.forge_init = 0.0  # zero-initialised (see `ForgePreTrainedModel._init_weights`)
        if self.attn is not None:
            self.attn.o_proj.forge_init = 0.0
        if self.post_norm:
            self.z_init.forge_init = 0.0  # z_0 = 0 (TRM starts z at a fixed state, not at the input)

    def attention_input(self, stream: torch.Tensor) -> torch.Tensor:
        """What the attention reads (and caches keys/values of) for the latent stream `z + h + y`."""
        return stream if self.post_norm else self.attn_norm(stream)

    def latent_update(
        self,
        z: torch.Tensor,
        stream: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        slot: int,
    ) -> torch.Tensor:
        """The new latent state from the old one and its input stream `z + h + y` (B, T, D)."""
        if self.post_norm:
            if self.attn is not None:
                attended = self.attn(stream, position_embeddings, attention_mask, past_key_values, slot)
                stream = self.attn_norm(stream + attended)
            return self.mlp_norm(stream + self.block(stream))
        if self.attn is None:
            return z + self.block(self.mlp_norm(stream))
        delta = self.attn(self.attn_norm(stream), position_embeddings, attention_mask, past_key_values, slot)
        return z + (delta + self.block(self.mlp_norm(stream + delta)))  # the sum first, as before (same floats)

    def answer_update(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The new answer state from the old one and the latent state (B, T, D), position-wise."""
        if self.post_norm_answer:
            stream = y + z
            return self.y_norm(stream + self.block(stream))
        return y + self.block(self.y_norm(y + z))


@dataclass
class RecursionOutput:
    """What the recursion hands to the model output (see `ForgeModelOutputWithPast`)."""

    last_hidden_state: torch.Tensor
    step_hidden_states: tuple[torch.Tensor, ...] | None
    halting_logits: torch.Tensor
    halt_steps: torch.Tensor


class ForgeRecursion(nn.Module):
    """Runs the TRM refiner for `trm_max_steps` supervision steps with ACT halting by masking.

    Each step runs `trm_cycles` cycles of the refiner: all but the last without gradient (TRM), the last with it; with
    deep supervision the carry is detached between steps (TRM): `z` entirely, `y` up to its identity path to the
    features `h = y_0` (`y <- h + (y - h).detach()`), and `h` itself never (TRM's input embedding is not), so every
    step's loss trains the backbone as a plain LM loss would. Each answer state `y_t` is normed for the LM head and
    scored by the ACT head `q_t = sigmoid(Linear(norm(y_t)))`. With halting on, a position whose `q_t` exceeds
    `act_threshold` stops: its `y` and `z` stay as they are, every later application still reads its (frozen) state
    through attention, and its output is its halting step's state. Cached decoding equals uncached decoding (both
    mask alike); a training forward with labels halts alike unless `act_halting_in_training` is off. The control
    flow does not depend on the data (the optional early break in eager mode is skipped under `torch.compile` and
    `torch.export`), so the forward exports. Training with the ACT loss explores (HRM/TRM): a share `act_exploration`
    of positions gets a random minimum step before which it may not halt (`explore`; never without the loss, whose
    targets it is for, so e.g. RL rewards computed from the model's outputs carry no exploration noise).
    """

    def __init__(self, config: ForgeConfig) -> None:
        super().__init__()
        self.config = config  # `trm_max_steps`, `act_threshold` and the detach rule are read live
        self.refiner = ForgeRefiner(config)
        self.norm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.act_head = nn.Linear(config.hidden_size, 1)
        # Zero weights and q_0 = sigmoid(-2) ~ 0.12 everywhere: every position refines at first and the Q-head learns
        # when to stop (HRM starts its Q-head at "continue" the same way).
        self.act_head.forge_init = -2.0

    def forward(
        self,
        features: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        keep_steps: bool,
        halting: bool,
        max_steps: int | None = None,
        explore: bool = False,
    ) -> RecursionOutput:
        config = self.config  # read live: thresholds and step counts may be changed on a loaded model
        steps = config.trm_max_steps if max_steps is None else max_steps
        if not 0 <= steps <= config.trm_max_steps:
            raise ValueError(
                f"recursion_steps={max_steps} is outside [0, trm_max_steps={config.trm_max_steps}]. Fix: pass a "
                "number of steps the model was built for."
            )
        micro, cycles, threshold = config.trm_micro_steps, config.trm_cycles, config.act_threshold
        first_slot = config.num_hidden_layers
        if past_key_values is not None and self.refiner.attn is not None:
            needed = first_slot + config.trm_max_steps * cycles * micro
            while len(past_key_values.layers) < needed:
                past_key_values.layers.append(_refiner_cache_layer(past_key_values.layers[0]))

        y, z = features, self.refiner.z_init(features)
        selected = self.norm(y)  # (B, T, D): each position's output state so far (its halting step's, once halted)
        states = [selected]
        halting_logits = [self.act_head(selected)]  # each (B, T, 1)
        halted = torch.zeros(features.shape[:-1], dtype=torch.bool, device=features.device)  # (B, T)
        min_step = None
        if halting and explore and config.act_exploration > 0:
            explore = torch.rand(halted.shape, device=features.device) < config.act_exploration
            random_step = torch.randint(1, max(steps, 1) + 1, halted.shape, device=features.device)
            min_step = torch.where(explore, random_step, torch.zeros_like(random_step))
        if halting:
            halted = self._may_halt(halting_logits[0], threshold, 0, min_step)
        halt_steps = torch.zeros(halted.shape, dtype=torch.long, device=features.device)
        eager = not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        for step in range(1, steps + 1):
            slot = first_slot + (step - 1) * cycles * micro
            if halting and eager and bool(halted.all()):
                # Nothing left to refine. Frozen states give every later application the same keys and values:
                # compute them once for the cache (decoding needs them) and skip the rest.
                self._fill_frozen_slots(features, y, z, position_embeddings, past_key_values, slot, steps, step)
                states.extend([selected] * (steps - step + 1))
                halting_logits.extend([halting_logits[-1]] * (steps - step + 1))
                break
            keep = halted[..., None] if halting else None
            for cycle in range(cycles):
                with torch.set_grad_enabled(torch.is_grad_enabled() and cycle == cycles - 1):
                    y_new, z = self._cycle(features, y, z, keep, position_embeddings, attention_mask, past_key_values,
                                           slot + cycle * micro)  # fmt: skip
                    y = y_new if keep is None else torch.where(keep, y, y_new)
            normed = self.norm(y)
            selected = normed if keep is None else torch.where(keep, selected, normed)
            states.append(selected)
            halting_logits.append(self.act_head(normed))
            halt_steps = halt_steps + (~halted).long()
            if halting:
                halted = halted | self._may_halt(halting_logits[-1], threshold, step, min_step)
            if config.detach_between_steps:
                # TRM's carry detach. The answer keeps a live identity path to the features (its refinement is
                # what is detached), as TRM's input injection keeps the embedding trained by every step's loss.
                y, z = features + (y - features).detach(), z.detach()
        return RecursionOutput(
            last_hidden_state=selected,
            step_hidden_states=tuple(states) if keep_steps else None,
            halting_logits=torch.cat(halting_logits, dim=-1),  # (B, T, K)
            halt_steps=halt_steps,
        )

    @staticmethod
    def _may_halt(logits: torch.Tensor, threshold: float, step: int, min_step: torch.Tensor | None) -> torch.Tensor:
        """(B, T) positions whose halting probability exceeds the threshold (and that explored far enough)."""
        halt = torch.sigmoid(logits.detach().squeeze(-1)) > threshold
        return halt if min_step is None else halt & (min_step <= step)

    def _cycle(self, features, y, z, keep, position_embeddings, attention_mask, past_key_values, slot):
        """One TRM cycle: `micro_steps` latent updates, then the answer update; halted positions keep their `z`."""
        for micro in range(self.config.trm_micro_steps):
            z_new = self.refiner.latent_update(z, z + features + y, position_embeddings, attention_mask,
                                               past_key_values, slot + micro)  # fmt: skip
            z = z_new if keep is None else torch.where(keep, z, z_new)
        return self.refiner.answer_update(y, z), z

    def _fill_frozen_slots(self, features, y, z, position_embeddings, past_key_values, slot, steps, step) -> None:
        if past_key_values is None or self.refiner.attn is None:
            return
        key, value = self.refiner.attn.key_value(self.refiner.attention_input(z + features + y),
                                                  position_embeddings)  # fmt: skip
        for index in range(slot, slot + (steps - step + 1) * self.config.trm_cycles * self.config.trm_micro_steps):
            past_key_values.update(key, value, index)


class ForgeThoughtMixer(nn.Module):
    """Quiet-STaR mixing head (Phase 3): `w = sigmoid(MLP([h_base; h_thought]))` per position blends the next-token
    log-probs predicted without and with a thought, `log_softmax(w * logp_thought + (1 - w) * logp_base)`
    (Zelikman et al., "Quiet-STaR", 2024). Built only when `config.thought_mixing_hidden_size` is set."""

    def __init__(self, config: ForgeConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * config.hidden_size, config.thought_mixing_hidden_size)
        self.fc2 = nn.Linear(config.thought_mixing_hidden_size, 1)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self,
        base_hidden: torch.Tensor,
        thought_hidden: torch.Tensor,
        base_logits: torch.Tensor,
        thought_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed log-probs (..., V) and the weight `w` (...,) from answer states (..., D) and logits (..., V)."""
        features = torch.cat([base_hidden, thought_hidden], dim=-1)  # (..., 2D)
        weight = torch.sigmoid(self.fc2(self.act_fn(self.fc1(features)))).squeeze(-1)  # (...,)
        base = F.log_softmax(base_logits.float(), dim=-1)
        thought = F.log_softmax(thought_logits.float(), dim=-1)
        mixed = weight[..., None] * thought + (1.0 - weight[..., None]) * base
        return F.log_softmax(mixed, dim=-1), weight


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ForgeModelOutputWithPast(BaseModelOutputWithPast):
    """
    Backbone + recursion output. `last_hidden_state` is the (normed) answer state the LM head reads: the halting
    step's `y` per position under ACT, else the final step's.

    step_hidden_states (`tuple(torch.FloatTensor)` of K tensors (B, T, D), *optional*):
        Normed answer states y_0..y_T, returned when asked (training, per-step losses).
    halting_logits (`torch.FloatTensor` (B, T, K), *optional*):
        ACT head logits per step (every position is scored at every step; a halted position's later scores are
        unused).
    halt_steps (`torch.LongTensor` (B, T)):
        Index of the step whose state each position outputs: its first `q_t > act_threshold` under ACT, else T.
    gate_means (`torch.FloatTensor` (B, L), *optional*):
        Mean MAG gate value per batch row and layer (share of attention; `1 - mean` is the memory's share).
    gate_entropy (`torch.FloatTensor` (B,), *optional*):
        Mean binary entropy of the gates per batch row, over layers, positions and channels (differentiable).
        Every field but `attention_logit_max` is batch-first, so pipelines can split a batched output by row.
    attention_logit_max (`torch.FloatTensor` (L, H), *optional*):
        Largest pre-softmax attention logit per layer and head over the whole batch, when asked (QK-clip).
    """

    step_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    halting_logits: torch.FloatTensor | None = None
    halt_steps: torch.LongTensor | None = None
    gate_means: torch.FloatTensor | None = None
    gate_entropy: torch.FloatTensor | None = None
    attention_logit_max: torch.FloatTensor | None = None


@dataclass
class ForgeCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    Causal LM output with the parts of the loss and the recursion's diagnostics.

    lm_loss (`torch.FloatTensor`): deep-supervised cross-entropy (weighted over steps) or the final step's.
    act_loss (`torch.FloatTensor`): ACT halting BCE.
    gate_entropy (`torch.FloatTensor`): mean gate entropy over the batch rows (the loss subtracts
        `gate_entropy_weight` times it).
    step_losses (`torch.FloatTensor` (K,)): cross-entropy of each step's logits.
    step_accuracies (`torch.FloatTensor` (K,)): next-token accuracy of each step's logits.
    step_logits (`tuple(torch.FloatTensor)`, *optional*): per-step logits (B, T, V), when asked.
    halting_probs (`torch.FloatTensor` (B, T, K), *optional*): ACT halting probabilities per step.
    halt_steps, gate_means, attention_logit_max: as in `ForgeModelOutputWithPast`.
    """

    lm_loss: torch.FloatTensor | None = None
    act_loss: torch.FloatTensor | None = None
    gate_entropy: torch.FloatTensor | None = None
    step_losses: torch.FloatTensor | None = None
    step_accuracies: torch.FloatTensor | None = None
    step_logits: tuple[torch.FloatTensor, ...] | None = None
    halting_probs: torch.FloatTensor | None = None
    halt_steps: torch.LongTensor | None = None
    gate_means: torch.FloatTensor | None = None
    attention_logit_max: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def forge_attention_masks(
    config: ForgeConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values: Cache | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> dict[str, torch.Tensor | None]:
    """The masks a forward needs, keyed by layer type as transformers' `create_masks_for_generate` keys them: the
    sliding-window causal mask of the attention, and the (B, T) padding mask of the memory (or None)."""
    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "past_key_values": past_key_values,
        "position_ids": position_ids,
    }
    return {
        "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs),
        "linear_attention": create_recurrent_attention_mask(**mask_kwargs),
    }


class ForgePreTrainedModel(PreTrainedModel):
    config_class = ForgeConfig
    config: ForgeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ForgeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The memory state cannot be rolled back to an earlier token, so assisted decoding is refused by `generate`.
    _is_stateful = True
    # `output_attentions=True` records each layer's attention weights (eager attention computes them).
    _can_record_outputs = {"attentions": OutputRecorder(ForgeAttention, index=1)}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation, except for BitNet layers (Phase 4): after loading, a packed layer unpacks its
        stored ternary weights here, once (as rotary frequencies are derived here), see `bitnet.py`."""
        if isinstance(module, (BitLinear, QuantizedEmbedding)):
            module.init_from_checkpoint(self.config.initializer_range)
            return
        super()._init_weights(module)
        if type(module) is nn.Linear and hasattr(module, "forge_init"):
            # Set by the recursion: zero output projections of the refiner (an untrained refiner is the identity on
            # y, so every step starts as step 0, the plain backbone LM), and the Q-head's starting bias.
            init.zeros_(module.weight)
            if module.bias is not None:
                init.constant_(module.bias, module.forge_init)
        if isinstance(module, ForgeNeuralMemory):
            module.reset_memory_parameters()


class ForgeModel(ForgePreTrainedModel):
    """Embedding, decoder layers and final norm (the backbone), then TRM recursion with ACT; `last_hidden_state` is
    what the LM head reads, so `lm_head(model.base_model(...).last_hidden_state)` gives the model's logits."""

    def __init__(self, config: ForgeConfig) -> None:
        super().__init__(config)
        config.check()
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([ForgeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ForgeRotaryEmbedding(config)
        self.recursion = ForgeRecursion(config)
        self.gradient_checkpointing = False
        apply_bitnet_layout(self)  # a BitNet checkpoint (config.bitnet): rebuild its ternary layers before loading
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict[str, torch.Tensor | None] | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_step_states: bool = False,
        act_halting: bool | None = None,
        output_attention_logit_max: bool = False,
        positions_to_keep: int | torch.Tensor = 0,
        recursion_steps: int | None = None,
        act_exploration: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ForgeModelOutputWithPast:
        r"""
        output_step_states (`bool`): also return every step's answer state and the ACT logits (needed for losses).
        act_halting (`bool`, *optional*): ACT halting (by masking, in training and inference alike); defaults to
            `config.act_halting`.
        output_attention_logit_max (`bool`): return each head's largest attention logit (QK-clip); costs a matmul.
        positions_to_keep (`int` or `torch.Tensor`): return `last_hidden_state` only at these positions, as
            `logits_to_keep` does for the LM head (0 keeps all). The recursion attends to the context, so it runs on
            every position.
        recursion_steps (`int`, *optional*): run this many recursion steps instead of `trm_max_steps` (inference).
        act_exploration (`bool`): ACT exploration (`config.act_exploration`); `ForgeForCausalLM` turns it on when it
            trains with labels.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if act_halting is None:
            act_halting = self.config.act_halting
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        if isinstance(attention_mask, dict):  # prepared by `create_masks_for_generate` (static cache, compile)
            sliding_mask, memory_mask = attention_mask["sliding_attention"], attention_mask.get("linear_attention")
        else:
            masks = forge_attention_masks(self.config, inputs_embeds, attention_mask, past_key_values, position_ids)
            sliding_mask, memory_mask = masks["sliding_attention"], masks["linear_attention"]
        memory_segments = self._memory_segments(position_ids, attention_mask, past_key_values, inputs_embeds.shape[0])
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        gate_means, gate_entropies, logit_maxes = [], [], []
        for layer_idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.config.layer_input_scales is not None:  # DFS merges (Phase 2) scale each layer's input stream
                hidden_states = hidden_states * self.config.layer_input_scales[layer_idx]
            hidden_states, gate_mean, gate_entropy, logit_max = layer(
                hidden_states,
                attention_mask=sliding_mask,
                memory_mask=memory_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                output_attention_logit_max=output_attention_logit_max,
                memory_segments=memory_segments,
                **kwargs,
            )
            if gate_mean is not None:
                gate_means.append(gate_mean)
                gate_entropies.append(gate_entropy)
            if logit_max is not None:
                logit_maxes.append(logit_max)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        recursion = self.recursion(
            hidden_states,
            position_embeddings,
            sliding_mask,
            past_key_values,
            keep_steps=output_step_states,
            halting=act_halting,
            max_steps=recursion_steps,
            explore=act_exploration,
        )
        return ForgeModelOutputWithPast(
            last_hidden_state=slice_logits_to_keep(recursion.last_hidden_state, positions_to_keep),
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
            step_hidden_states=recursion.step_hidden_states,
            halting_logits=recursion.halting_logits,
            halt_steps=recursion.halt_steps,
            gate_means=torch.stack(gate_means, dim=-1) if gate_means else None,  # (B, L)
            gate_entropy=torch.stack(gate_entropies, dim=-1).mean(-1) if gate_entropies else None,  # (B,)
            attention_logit_max=torch.stack(logit_maxes) if logit_maxes else None,
        )

    def _memory_segments(
        self,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        batch_size: int,
    ) -> torch.LongTensor | None:
        """(B, T) document index per position when a padding-free packed batch is given (no attention mask,
        `position_ids` restarting as `DataCollatorWithFlattening` and TRL's `padding_free` produce, nothing cached
        yet), so every document's memory starts empty; None otherwise. The rule is transformers' packed-sequence
        detection for attention masks (`find_packed_sequence_indices`)."""
        if self.config.memory_type == "none" or attention_mask is not None or position_ids.shape[-1] < 2:
            return None
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            return None
        return find_packed_sequence_indices(position_ids.expand(batch_size, -1))


def _is_top1(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1.0 where the target's logit is the largest, (..., V) -> (...,): `amax` is several times faster than `argmax`
    over a 32k vocabulary on CPU; an exact tie with the maximum counts as correct."""
    return (logits.gather(-1, targets[..., None]).squeeze(-1) >= logits.amax(-1)).float()


class ForgeForCausalLM(ForgePreTrainedModel, GenerationMixin):
    """`ForgeModel` with a tied LM head and the training objective:
    `loss = CE (deep-supervised over steps) + act_loss_weight * ACT_BCE - gate_entropy_weight * gate_entropy`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ForgeConfig) -> None:
        super().__init__(config)
        self.model = ForgeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Phase 3's Quiet-STaR mixing head; unused by forward/generate (see `ForgeThoughtMixer`).
        self.thought_mixer = ForgeThoughtMixer(config) if config.thought_mixing_hidden_size else None
        apply_bitnet_layout(self)  # a BitNet checkpoint with a low-bit tied embedding: the head reads its weights
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_step_logits: bool = False,
        act_halting: bool | None = None,
        output_attention_logit_max: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        recursion_steps: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ForgeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` (B, T), *optional*): next-token targets, shifted inside (HF convention); -100 is
            ignored.
        output_step_logits (`bool`): return the logits of every recursion step (each position's state at that step,
            a halted position's state frozen at its halting step).
        act_halting (`bool`, *optional*): ACT halting; defaults to `config.act_halting` (a training forward with
            labels adds exploration), except that with `config.act_halting_in_training` off a training forward with
            labels runs every step on every position and reports where ACT would halt.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): label-token count over the whole accumulated (and
            distributed) batch, passed by `Trainer`; every loss term is a sum over tokens divided by it, so
            gradient accumulation and DDP average correctly.
        shift_labels (`torch.LongTensor` (B, T), *optional*): targets already shifted (position t predicts
            `shift_labels[:, t]`), as context-parallel training passes them; used instead of shifting `labels`. A
            keyword argument (as in transformers' own models), so `Trainer` keeps `labels` as the only label name.
        recursion_steps (`int`, *optional*): run this many recursion steps instead of `trm_max_steps` (inference).
        """
        shift_labels = kwargs.pop("shift_labels", None)
        has_targets = labels is not None or shift_labels is not None
        keep_steps = has_targets or output_step_logits
        training_run = self.training and has_targets
        report_would_halt = False
        if training_run and act_halting is None and not self.config.act_halting_in_training:
            # Training runs every step on every position, so each step is trained as an exit on every token and the
            # Q-head's targets compare real later steps; inference halts by masking (see `act_halting_in_training`).
            act_halting, report_would_halt = False, self.config.act_halting
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_step_states=keep_steps,
            act_halting=act_halting,
            output_attention_logit_max=output_attention_logit_max,
            positions_to_keep=0 if keep_steps else logits_to_keep,
            recursion_steps=recursion_steps,
            act_exploration=training_run,
            **kwargs,
        )
        # One full-vocabulary pass for the output: the last state is each position's ACT-selected answer state.
        full_logits = self.lm_head(outputs.last_hidden_state)
        step_logits = None
        if output_step_logits:
            states = outputs.step_hidden_states
            step_logits = tuple(self.lm_head(state) for state in states[:-1]) + (full_logits,)
        logits = slice_logits_to_keep(full_logits, logits_to_keep) if keep_steps else full_logits

        halting_probs = torch.sigmoid(outputs.halting_logits.detach())
        result = ForgeCausalLMOutputWithPast(
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            step_logits=step_logits,
            halting_probs=halting_probs,
            halt_steps=outputs.halt_steps,
            gate_means=outputs.gate_means,
            gate_entropy=outputs.gate_entropy.detach().mean() if outputs.gate_entropy is not None else None,
            attention_logit_max=outputs.attention_logit_max,
        )
        if has_targets:
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]  # token t predicts t+1
            self._add_losses(result, outputs, step_logits, full_logits, shift_labels, num_items_in_batch)
        if report_would_halt:
            # The halting step ACT would choose from these states (first `q_t > act_threshold`), for the metrics.
            crossed = halting_probs > self.config.act_threshold  # (B, T, K)
            last = torch.full_like(outputs.halt_steps, crossed.shape[-1] - 1)
            result.halt_steps = torch.where(crossed.any(-1), crossed.long().argmax(-1), last)
        return result

    @torch.no_grad()
    def calibrate_act_threshold(
        self,
        sources: dict[str, tuple[torch.Tensor, torch.Tensor]],
        max_loss_increase: float = 0.01,
        candidates: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    ) -> dict:
        """Set `config.act_threshold` to the lowest candidate (fewest steps) whose ACT loss on every source stays
        within `max_loss_increase` (relative) of running every step: a held-out calibration of the early exit, as CALM
        (Schuster et al., 2022) calibrates its thresholds. No fixed threshold met a 1% budget on every tiny seed
        measured, while each trained model had one that did (README, "Measured").

        Args:
            sources: name -> (input_ids, labels) of held-out data (labels -100 on padding; scored on real tokens only).
            max_loss_increase: allowed relative loss increase per source, e.g. 0.01 for 1%.
            candidates: thresholds to try, each strictly between 0 and 1.

        Returns:
            `{"threshold": chosen or None, "table": {threshold: {source: (mean steps, relative loss increase)}}}`;
            with no candidate within budget the threshold is left as it was and `"threshold"` is None.
        """
        if not sources:
            raise ValueError("calibrate_act_threshold: `sources` is empty. Fix: pass {name: (input_ids, labels)}.")
        if any(not 0.0 < value < 1.0 for value in candidates):
            raise ValueError(
                f"calibrate_act_threshold: candidates {list(candidates)} must lie strictly between 0 and 1."
            )
        was_training, previous = self.training, self.config.act_threshold
        self.eval()
        every = {
            name: self(ids, labels=labels, act_halting=False).step_losses[-1]
            for name, (ids, labels) in sources.items()
        }
        table, chosen = {}, None
        try:
            for value in sorted(candidates):
                self.config.act_threshold = value
                row = {}
                for name, (ids, labels) in sources.items():
                    out = self(ids, labels=labels, act_halting=True)
                    real = (F.pad(labels, (0, 1), value=-100)[..., 1:] != -100).to(out.halt_steps.device)
                    increase = float(out.step_losses[-1] / every[name].clamp(min=1e-12) - 1.0)
                    row[name] = (float(out.halt_steps[real].float().mean()), increase)
                table[value] = row
                if chosen is None and all(increase <= max_loss_increase for _, increase in row.values()):
                    chosen = value
        finally:
            self.config.act_threshold = previous if chosen is None else chosen
            self.train(was_training)
        return {"threshold": chosen, "table": table}

    def create_masks_for_generate(self, **kwargs) -> dict[str, torch.Tensor | None]:
        """Masks `generate` prepares ahead of a compilable (static) cache's forward. transformers' generic version maps
        the `hybrid_sliding` layer type to a full causal mask; this model's attention is sliding-window."""
        names = ("config", "inputs_embeds", "attention_mask", "past_key_values", "position_ids")
        return forge_attention_masks(**{name: kwargs.get(name) for name in names})

    def _add_losses(
        self,
        result: ForgeCausalLMOutputWithPast,
        outputs: ForgeModelOutputWithPast,
        step_logits: tuple[torch.Tensor, ...] | None,
        final_logits: torch.Tensor,
        shift_labels: torch.LongTensor,
        num_items_in_batch: int | torch.Tensor | None,
    ) -> None:
        """Fill the loss and its parts from already-shifted targets (B, T).

        Every term is (sum over label tokens) / denominator, where the denominator is `num_items_in_batch` when
        Trainer gives it (accumulation/DDP-correct), else this batch's label count.

        - Output term: cross-entropy of the final logits on every label position. Under ACT each position's final
          state is its halting step's, with that step's gradient, so this is the loss of what inference outputs.
        - Deep supervision (TRM): each earlier step `t`'s cross-entropy on the positions still refining at `t`
          (a halted position is not supervised again), weighted by `trm_step_weights`. In training with
          `deep_supervision_fraction < 1` the earlier steps are scored on a random subset of the label positions,
          which skips most of the extra full-vocabulary LM-head passes: summed over the subset (each step weighted by
          the fraction, low variance) or, with `deep_supervision_rescale`, rescaled to an unbiased estimate.
        - ACT (TRM's Q-head): BCE of `q_t` against "step t's prediction is already right" on the positions still
          refining at `t`, averaged over steps (every step, the last included, on the sampled positions); or, with
          `act_target="saturated"`, against "no later step lowers this token's loss by more than
          `act_saturation_margin`" on the positions that ran step t+1, over steps 0..T-1.

        `step_losses[t]` is the loss of stopping at step t (states of halted positions frozen), the per-step
        diagnostic; `lm_loss` is the weighted training objective.
        """
        config = self.config
        states = outputs.step_hidden_states
        n_steps = len(states)
        flat_labels = shift_labels.to(final_logits.device).reshape(-1)
        valid = torch.nonzero(flat_labels != -100).squeeze(-1)  # (N,) flat positions with a label
        n_valid = valid.numel()
        if num_items_in_batch is not None:
            denominator = torch.as_tensor(num_items_in_batch, device=final_logits.device, dtype=torch.float32)
        else:
            denominator = torch.tensor(float(max(n_valid, 1)), device=final_logits.device)
        sampled, sample_index = valid, None
        fraction = config.deep_supervision_fraction
        if self.training and step_logits is None and fraction < 1.0 and n_valid > 0:
            keep = max(1, round(fraction * n_valid))
            sample_index = torch.randperm(n_valid, device=valid.device)[:keep]  # into `valid`
            sampled = valid[sample_index]

        halt_steps = outputs.halt_steps.reshape(-1)  # (B*T,)
        halting_logits = outputs.halting_logits.reshape(-1, n_steps)  # (B*T, K)
        vocab = final_logits.shape[-1]
        scale = n_valid / max(sampled.numel(), 1)  # rescales a subset to the full label count
        # Intermediate steps: one LM-head pass over every earlier step's sampled rows together (one weight-gradient
        # matmul instead of one per step).
        inter = n_steps - 1
        if inter and step_logits is not None:
            inter_logits = torch.stack([step_logits[t].reshape(-1, vocab)[sampled] for t in range(inter)])
        elif inter:
            with torch.set_grad_enabled(torch.is_grad_enabled() and config.deep_supervision):
                rows_states = torch.stack([states[t].reshape(-1, states[t].shape[-1])[sampled] for t in range(inter)])
                inter_logits = self.lm_head(rows_states.reshape(inter * sampled.numel(), -1)).view(
                    inter, sampled.numel(), vocab
                )
        if inter:
            inter_targets = flat_labels[sampled]
            inter_ce = F.cross_entropy(
                inter_logits.reshape(-1, vocab).float(), inter_targets.repeat(inter), reduction="none"
            ).view(inter, sampled.numel())  # (K-1, S)
            inter_correct = _is_top1(inter_logits.detach(), inter_targets.expand(inter, -1))  # (K-1, S)
        # Final step on every label position, straight from the full logits: gathering the label rows first would copy
        # (and, in backward, scatter into a zeroed) B*T x V tensor. Its accuracy (a metric and, with
        # `act_target="correct"`, the last step's ACT target) is taken on the sampled rows, an unbiased estimate that
        # skips a full-vocabulary argmax over every position.
        final_ce = F.cross_entropy(
            final_logits.reshape(-1, vocab).float(), flat_labels, ignore_index=-100, reduction="none"
        )[valid]  # (N,)
        final_correct = _is_top1(final_logits.detach().reshape(-1, vocab)[sampled], flat_labels[sampled])

        step_losses, train_terms, step_correct, act_terms, sampled_ce = [], [], [], [], []
        for step in range(n_steps):
            final = step == n_steps - 1
            rows = valid if final else sampled
            ce = final_ce if final else inter_ce[step]  # (rows,)
            correct = final_correct if final else inter_correct[step]  # (sampled rows,)
            row_scale = n_valid / max(rows.numel(), 1)
            refining = (halt_steps[rows] >= step).float()  # still refining at this step (not halted before it)
            step_losses.append(ce.detach().sum() * row_scale / denominator)
            train_scale = row_scale if final or config.deep_supervision_rescale else 1.0
            train_terms.append((ce.sum() if final else (ce * refining).sum()) * train_scale / denominator)
            step_correct.append(correct.mean() if sampled.numel() else correct.sum())
            if config.act_target == "correct":
                on_sampled = (halt_steps[sampled] >= step).float()
                bce = F.binary_cross_entropy_with_logits(halting_logits[sampled, step].float(), correct,
                                                         reduction="none")  # fmt: skip
                act_terms.append((bce * on_sampled).sum() * scale / n_steps)
            else:
                sampled_ce.append(ce.detach()[sample_index] if final and sample_index is not None else ce.detach())
        if config.act_target == "saturated" and n_steps > 1:
            # Target of q_t: "no later step lowers this token's loss by more than act_saturation_margin", on the
            # positions that ran step t+1 (a position halted at t has frozen later states, so its own later losses
            # say nothing; exploration supplies those counterfactuals). The last step decides nothing.
            ces = torch.stack(sampled_ce, dim=-1)  # (rows, K)
            later_best = ces.flip(-1).cummin(-1).values.flip(-1)[:, 1:]  # (rows, K-1): min over s > t
            saturated = (later_best > ces[:, :-1] - config.act_saturation_margin).float()
            ran_next = (halt_steps[sampled][:, None] > torch.arange(n_steps - 1, device=ces.device)).float()
            bce = F.binary_cross_entropy_with_logits(halting_logits[sampled, :-1].float(), saturated, reduction="none")
            act_terms.append((bce * ran_next).sum() * scale / (n_steps - 1))
        if not act_terms:
            act_terms.append(halting_logits.sum() * 0.0)
        terms = torch.stack(train_terms)  # (K,)
        if config.deep_supervision:
            if len(config.trm_step_weights) != config.trm_max_steps + 1:  # trm_max_steps is read live
                raise ValueError(
                    f"ForgeConfig.trm_step_weights has {len(config.trm_step_weights)} entries but trm_max_steps="
                    f"{config.trm_max_steps} needs {config.trm_max_steps + 1}. Fix: set config.trm_step_weights = "
                    "None and call config.check() to re-derive them, or give one weight per step."
                )
            # `recursion_steps` may run fewer steps than trm_max_steps: their weights are the first ones.
            weights = torch.tensor(config.trm_step_weights[:n_steps], device=terms.device, dtype=terms.dtype)
            lm_loss = (weights * terms).sum() / weights.sum()
        else:
            lm_loss = terms[-1]
        act_loss = torch.stack(act_terms).sum() / denominator

        loss = lm_loss + config.act_loss_weight * act_loss
        if outputs.gate_entropy is not None:
            # A per-batch mean, rescaled to this batch's share of the accumulated tokens.
            loss = loss - config.gate_entropy_weight * outputs.gate_entropy.mean() * (n_valid / denominator)

        result.loss = loss
        result.lm_loss = lm_loss.detach()
        result.act_loss = act_loss.detach()
        result.step_losses = torch.stack(step_losses)
        result.step_accuracies = torch.stack(step_correct)


__all__ = [
    "ForgeForCausalLM",
    "ForgeModel",
    "ForgePreTrainedModel",
    "ForgeCausalLMOutputWithPast",
    "ForgeModelOutputWithPast",
    "ForgeThoughtMixer",
    "ema_scan",
    "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent",
]
