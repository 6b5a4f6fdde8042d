"""Configuration of the TRM x Titans-MAG ("forge") language model."""

import json
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
MEMORY_TYPES = ("neural", "ema", "none")
DEFAULT_MAG_MIX = "memory_at_attention_rms"
MAG_MIXES = ("memory_at_attention_rms", "raw", "normed")
# Deep-supervision weights the specification gives for y0..y3 (three recursion steps).
DEFAULT_STEP_WEIGHTS = (0.33, 0.5, 0.75, 1.0)


def available_presets() -> list[str]:
    """Names of the presets shipped in `modeling_forge/presets/`."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


@strict
class ForgeConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ForgeForCausalLM`]: a decoder whose layers combine causal sliding-window attention with a
    long-term memory through a learned gate (Titans "memory as gate"), followed by TRM recursive refinement of the
    output features with an ACT halting head.

    Args:
        vocab_size (`int`, *optional*, defaults to 32768):
            Number of tokens in the vocabulary (rows of the embedding and of the tied LM head).
        hidden_size (`int`, *optional*, defaults to 320):
            Width `D` of the residual stream.
        intermediate_size (`int`, *optional*, defaults to 1088):
            Hidden width of each layer's SwiGLU feed-forward block.
        num_hidden_layers (`int`, *optional*, defaults to 8):
            Number of decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 5):
            Attention heads per layer; `hidden_size` must be divisible by it.
        head_dim (`int`, *optional*):
            Per-head width; defaults to `hidden_size // num_attention_heads`. Must be even (rotary embeddings).
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            Longest sequence the model is trained for (rotary embeddings themselves are not limited by it).
        sliding_window (`int`, *optional*, defaults to 1024):
            Each token attends to itself and the `sliding_window - 1` tokens before it. Older context reaches a
            token only through the long-term memory.
        rope_parameters (`dict`, *optional*):
            Rotary embedding parameters in the transformers format, e.g. `{"rope_type": "default", "rope_theta":
            10000.0}`.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the RMS norms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
        attention_bias (`bool`, *optional*, defaults to `False`):
            Whether the q/k/v/o projections have biases.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities during training.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the SwiGLU blocks and of the gate MLP.
        memory_type (`str`, *optional*, defaults to `"ema"`):
            Long-term memory branch: `"neural"` (Titans' linear memory: per head a matrix `S` written at every token
            by one gradient step on `||S k_t - v_t||^2` with data-dependent step size and forgetting, i.e. the gated
            delta rule, read as `S_t q_t`), `"ema"` (a causal exponential moving average of a down-projection of the
            layer input, read out through an up-projection; the ablation without content addressing) or `"none"`
            (attention only, no gate; the ablation).
        memory_layers (`list[int]`, *optional*):
            0-based indices of the decoder layers that carry the memory branch and its MAG gate; the others are
            sliding-window attention only. `None` (the default, and the specification's layout): every layer. A
            hybrid stack like titans-pytorch's training script (`NEURAL_MEM_LAYERS = (2, 4, 6)` of 8): memory in
            every other layer of cognate-25m trains 1.47x a Llama step instead of 1.61x, but on the tiny preset the
            memory in one of two layers cost most of the perplexity gain (README, "Measured").
        memory_size (`int`, *optional*, defaults to 160):
            Width `d_mem` of the memory: the EMA state, or the total query/key/value width of the neural memory
            (`memory_num_heads` heads of `memory_size // memory_num_heads` channels).
        memory_num_heads (`int`, *optional*):
            Heads of the neural memory (each holds a `d x d` matrix, `d = memory_size // memory_num_heads`); defaults
            to `num_attention_heads`.
        memory_conv_size (`int`, *optional*, defaults to 4):
            Taps of the short causal depthwise convolution on the neural memory's queries, keys and values.
        memory_dt_min (`float`, *optional*, defaults to 0.001):
        memory_dt_max (`float`, *optional*, defaults to 0.01):
            Range of the neural memory's initial forgetting rates: per head `softplus(dt_bias)` is drawn log-uniformly
            in `[memory_dt_min, memory_dt_max]` (Mamba2's dt initialisation), so the memory starts slow
            (`a_t ~ exp(-dt)`, about 0.99-0.999 per token); fast initial forgetting (`a_t ~ 0.5`) left the recall
            benchmark at chance.
        memory_forget_scale (`float`, *optional*, defaults to 1.0):
            Multiplies the neural memory's forgetting rate `-g_t` (below 1 remembers longer) without changing a
            parameter; Phase 1's memory specialisation sets it (`memory_decay_scale`), Phase 2 merges average it.
        memory_decay (`float`, *optional*, defaults to 0.99):
            EMA decay (`memory_type="ema"` only): `m_t = decay * m_{t-1} + (1 - decay) * W_down x_t`. Closer to 1
            remembers longer.
        memory_chunk_size (`int`, *optional*, defaults to 64):
            Chunk length of the parallel (chunked) form of either memory; a speed knob, not a modelling one, except
            with `memory_momentum` or `memory_deep`, whose mini-batch form (Titans §3.2) takes each chunk's gradients
            at the memory entering the chunk: there the chunk length is part of the model.
        memory_momentum (`bool`, *optional*, defaults to `False`):
            Titans' momentum ("surprise", eq. 10) on the neural memory: `Z_t = eta_t Z_{t-1} - b_t grad_t`,
            `S_t = a_t S_{t-1} + Z_t`, `eta_t = sigmoid(W_eta x_t)`, gradients taken at the chunk-start memory
            (mini-batch form, Titans §3.2). Cached decoding carries `S`, `Z`, the chunk-start point and the chunk
            position, equal to the uncached run. Off by default: on `benchmarks/recall.py` it did not pay for its cost.
        memory_deep (`bool`, *optional*, defaults to `False`):
            Titans' deep memory: per head a 2-layer MLP `M(x) = SiLU(x W1) W2` instead of the matrix `S`, updated once
            per chunk by the summed per-token gradients at the chunk-start weights (`torch.func`), with forgetting
            and (with `memory_momentum`) momentum across chunks; a token reads the weights entering its chunk. Off by
            default (see `benchmarks/recall.py`); no cached continuation and no padding-free packing.
        memory_deep_expansion (`int`, *optional*, defaults to 2):
            Hidden width of the deep memory's MLP, as a multiple of the memory head size.
        gate_hidden_size (`int`, *optional*, defaults to 160):
            Hidden width of the MAG gate MLP `g = sigmoid(MLP([y; m]))`.
        mag_mix (`str`, *optional*, defaults to `"memory_at_attention_rms"`):
            What the MAG gate mixes; it always reads both branches RMS-normed (Titans §4.2) and mixes
            `g * attention + (1 - g) * memory` per channel. `"memory_at_attention_rms"`: the raw attention output and
            the RMS-normed memory rescaled, per token, to the attention output's RMS (both branches at the scale a
            pre-norm residual branch has, and at the same scale as each other, so the gate's choice is a balanced
            one). `"raw"`: both branches as they come (the memory is then at its own output scale). `"normed"`: both
            normed, as Titans writes it (every layer adds a unit-RMS vector to the residual stream). Measured on the
            tiny preset (README, "MAG mix"; `benchmarks/vs_baseline.py --steps 200` validation perplexity, and
            `benchmarks/recall.py --models neural --trm-steps 0 --steps 600` recall near / far):
            memory_at_attention_rms 71.5, 0.522 / 0.523; raw 74.4, 0.322 / 0.285; normed 93.2, 0.533 / 0.519 (the
            memory alone normed: 106.3, 0.245 / 0.098; both normed times learnable scales: 0.021 / 0.008). One run
            each: reruns of the default gave 71.5 to 74.1, so the perplexity gap to `raw` is within noise; the recall
            gap (0.2, against 0.01 between two reruns of the default with recursion) and `normed`'s perplexity are
            not. Configs
            saved with the older `mag_normed_output` boolean load as `"normed"` (True) or `"raw"` (False).
        trm_max_steps (`int`, *optional*, defaults to 3):
            Supervision steps `T_max` of the TRM refiner on top of the backbone (0 disables refinement). Step 0 is the
            backbone's own prediction (`y_0 = h`).
        trm_micro_steps (`int`, *optional*, defaults to 2):
            Latent updates `z <- z + Block(z + h + y)` per cycle, before the answer update `y <- y + SwiGLU(y + z)`.
        trm_cycles (`int`, *optional*, defaults to 1):
            Refiner cycles per supervision step (TRM's `T`): all but the last run without gradient, the last with it.
        trm_attention (`bool`, *optional*, defaults to `True`):
            Whether the refiner's block has causal sliding-window self-attention over the refined states (TRM's
            self-attention block, so a step can use the context; its keys/values per application are cached for
            generation) or is position-wise only (the ablation).
        trm_norm (`str`, *optional*, defaults to `"pre"`):
            Form of the refiner's block: `"pre"` (residual updates `z <- z + Block(z + h + y)`,
            `y <- y + SwiGLU(RMSNorm(y + z))`, the first design), `"post"` (TRM's: each sublayer
            `s <- RMSNorm(s + f(s))` and each update replaces its state, so `z` and `y` stay at unit scale) or
            `"post_latent"` (the latent update post-norm, the answer update residual). `"pre"` is the default, so
            configs saved before this field existed load as they were trained. See `ForgeRefiner` and the README's
            Measured table.
        trm_intermediate_size (`int`, *optional*, defaults to 640):
            Hidden width of the refiner's SwiGLU, shared by the `z` and `y` updates.
        deep_supervision (`bool`, *optional*, defaults to `True`):
            Train on the logits of every recursion step with `trm_step_weights` (on), or on the final step only (off).
        deep_supervision_fraction (`float`, *optional*, defaults to 1.0):
            Share of label positions on which the intermediate steps' cross-entropy and the ACT targets are computed
            during training (see `deep_supervision_rescale`). Below 1 it skips most intermediate LM-head passes,
            which dominate compute and memory at large vocabularies. The final output is always scored on every
            position, and evaluation scores every step on every position.
        deep_supervision_rescale (`bool`, *optional*, defaults to `False`):
            With `deep_supervision_fraction < 1`, whether the sampled intermediate terms are rescaled to the full label
            count. On: an unbiased estimate of supervising every position, but its gradient rests on the sampled rows
            alone, at `1 / fraction` times their weight. Off (the default): each intermediate step is weighted by the
            fraction, a lower-variance, down-weighted objective. On `benchmarks/recursion.py` (tiny, 300 steps, 12.5%
            of positions) the unbiased estimate cost 0.15 / 0.16 / 0.32 nats of arithmetic / code / corpus loss
            against every position, and the down-weighted one 0.02 / 0.01 / 0.04 (4-seed means). The per-step loss
            diagnostics are rescaled either way.
        trm_detach_between_steps (`bool`, *optional*):
            Detach the carry `(y, z)` between supervision steps (TRM), so each step's loss trains that step's
            computation (and, through `h`, the backbone) only. Unset means "detach when `deep_supervision` is on".
            Detaching with deep supervision off is refused: every step but the last would get no training signal.
        trm_step_weights (`list[float]`, *optional*):
            Loss weights of `y_0 .. y_T`; length `trm_max_steps + 1`. Defaults to `[0.33, 0.5, 0.75, 1.0]` for three
            steps and to a linear ramp from 0.33 to 1.0 otherwise.
        act_threshold (`float`, *optional*, defaults to 0.7):
            A position stops refining once its halting probability `q_t` exceeds this (per specialisation: lower
            halts earlier). At 0.7 ACT stayed within 1% of running every step on each source in every seed measured,
            though one seed ran 66% of the steps (see `act_target`); `ForgeForCausalLM.calibrate_act_threshold` picks
            a trained model's own lowest threshold within a loss budget on held-out data.
        act_halting (`bool`, *optional*, defaults to `True`):
            ACT halting, by masking, in training and inference alike (halted positions keep their state and later
            steps still read it). Off: every position runs every step.
        act_exploration (`float`, *optional*, defaults to 0.1):
            Share of positions that, in training, get a random minimum step before which they may not halt (HRM/TRM's
            exploration), so the Q-head also sees later steps of positions it would stop early.
        act_halting_in_training (`bool`, *optional*, defaults to `False`):
            Off (the default): a training forward with labels runs every step on every position, so every step is
            trained as an exit on every token; it reports the step ACT would halt at (`halt_steps`), and inference
            still halts by masking. On: halt by masking in training too, with exploration (training computes exactly
            what ACT inference does, but a halted position never trains its later steps: ~85% of arithmetic and code
            tokens halted at step 0 and the steps did nothing). Measured on `benchmarks/recursion.py` (tiny, 300 steps,
            seeds 0 / 1, inference steps 0 -> 3 on the numbers the worked arithmetic computes): off 2.547 -> 2.462 and
            2.614 -> 2.492 nats, lower at every step; on 2.479 -> 2.522 and 2.555 -> 2.523. Off costs ~0.02 nats of
            corpus loss (2-seed mean) and makes ACT's early halts cost loss (README, "Measured").
        act_loss_weight (`float`, *optional*, defaults to 0.01):
            Weight of the ACT BCE loss.
        act_target (`str`, *optional*, defaults to `"saturated"`):
            Target of the Q-head `q_t`: `"saturated"` ("no later step lowers this token's loss by more than
            `act_saturation_margin`", in the spirit of PonderNet/CALM: halt where more recursion does not help,
            continue where it does) or `"correct"` (TRM/HRM: "step t already predicts the label"). Measured on
            `benchmarks/recursion.py` (tiny, 300 steps, seeds 0-3, halting off in training): with `"saturated"` and
            margin 0.003, ACT at threshold 0.7 runs 60% / 55% / 55% / 66% of the steps for at most +0.28% / +0.11% /
            +0.80% / +0.27% loss on each of arithmetic, code and corpus vs running every step (0.6: 44% / 39% / 39% /
            50%, but +2.3% on seed 2's arithmetic); `"correct"` halts arithmetic at 12% of the steps for +7.8% loss,
            since a token can be right at step 0 and still gain.
        act_saturation_margin (`float`, *optional*, defaults to 0.003):
            Loss improvement (nats per token) below which later steps count as not helping (`act_target="saturated"`).
            0.01 halted more and cost more (threshold 0.8, seed 0: 59% of the steps, +1.3% arithmetic loss).
        gate_entropy_weight (`float`, *optional*, defaults to 0.001):
            Weight of the gate-entropy regulariser; the loss subtracts `weight * entropy` to keep gates from
            saturating.
        layer_types (`list[str]`, *optional*):
            Derived from `memory_type` and `num_hidden_layers`, best left unset: `"hybrid_sliding"` per layer with
            memory (sliding-window KV + a recurrent state in the transformers cache), `"sliding_attention"` without.
            A value given by hand is checked against that and refused when it differs.
        layer_input_scales (`list[float]`, *optional*):
            One positive factor per decoder layer: layer `i` receives the residual stream multiplied by
            `layer_input_scales[i]`. Set by Phase 2's data-flow-space merges (DFS), which stack, repeat and reorder
            layers and scale each one's input (Akiba et al., "Evolutionary Optimization of Model Merging Recipes",
            2024). Each layer starts with an RMS norm, so the factor shifts the balance between the incoming stream and
            the layer's update, which no rescaling of the weights can express. `None`: no scaling.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether forwards return the cache for generation.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*):
            Special token ids, normally taken from the tokenizer.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Tie the LM head to the input embedding.
        bitnet (`dict`, *optional*):
            Set by Phase 4 (BitNet b1.58, `modeling_forge/bitnet.py`), never by hand: which linear layers are ternary
            and how they are stored. Keys: `format` (`"packed"`: 2-bit weights, the checkpoint form; `"shadow"`:
            full-precision shadow weights for STE training), `packing` (the 2-bit layout, transformers' BitNet one),
            `modules` (backbone-relative names of the ternary layers), `activation_bits` (per-token absmax, 8),
            `embedding_bits` (32, 16, 8 or 4: storage of the tied embedding / LM head) and `embedding_group_size`
            (columns per scale of an 8-/4-bit embedding). The model constructors rebuild those layers from it, so
            `from_pretrained` loads a packed checkpoint. `None`: an ordinary full-precision model.
        thought_mixing_hidden_size (`int`, *optional*):
            Set by Phase 3 (Quiet-STaR): hidden width of the thought mixing head, which reads the answer states
            without and with a thought (`[h_base; h_thought]`) and outputs `w = sigmoid(MLP(.))` per position to blend
            the two next-token distributions (`w * logp_thought + (1 - w) * logp_base`, renormalised). Only
            thought-aware decoding (`trainers.quietstar_trainer.generate_with_thoughts`) uses it; plain `forward` and
            `generate` ignore it. `None`: no mixing head.

    Example:
    ```python
    >>> from modeling_forge import ForgeConfig, ForgeForCausalLM
    >>> config = ForgeConfig.from_preset("tiny", vocab_size=512)
    >>> model = ForgeForCausalLM(config)
    ```
    """

    model_type = "forge"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32768
    hidden_size: int = 320
    intermediate_size: int = 1088
    num_hidden_layers: int = 8
    num_attention_heads: int = 5
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    sliding_window: int = 1024
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    memory_type: str = "ema"
    memory_layers: list[int] | None = None
    memory_size: int = 160
    memory_num_heads: int | None = None
    memory_conv_size: int = 4
    memory_dt_min: float = 0.001
    memory_dt_max: float = 0.01
    memory_forget_scale: float = 1.0
    memory_decay: float = 0.99
    memory_chunk_size: int = 64
    memory_momentum: bool = False
    memory_deep: bool = False
    memory_deep_expansion: int = 2
    gate_hidden_size: int = 160
    mag_mix: str = DEFAULT_MAG_MIX
    trm_max_steps: int = 3
    trm_micro_steps: int = 2
    trm_cycles: int = 1
    trm_attention: bool = True
    trm_norm: str = "pre"
    trm_intermediate_size: int = 640
    deep_supervision: bool = True
    deep_supervision_fraction: float = 1.0
    deep_supervision_rescale: bool = False
    trm_detach_between_steps: bool | None = None
    trm_step_weights: list[float] | None = None
    act_threshold: float = 0.7
    act_halting: bool = True
    act_exploration: float = 0.1
    act_halting_in_training: bool = False
    act_loss_weight: float = 0.01
    act_target: str = "saturated"
    act_saturation_margin: float = 0.003
    gate_entropy_weight: float = 0.001
    layer_types: list[str] | None = None
    layer_input_scales: list[float] | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    bitnet: dict | None = None
    thought_mixing_hidden_size: int | None = None

    def __post_init__(self, **kwargs):
        legacy = kwargs.pop("mag_normed_output", None)  # the boolean `mag_mix` replaced (configs saved before it)
        if legacy is not None:
            if self.mag_mix not in (DEFAULT_MAG_MIX, "normed" if legacy else "raw"):
                raise ValueError(
                    f"ForgeConfig.mag_normed_output={legacy} (the older name for mag_mix='normed'/'raw') contradicts "
                    f"mag_mix={self.mag_mix!r}. Fix: drop mag_normed_output and set only mag_mix."
                )
            self.mag_mix = "normed" if legacy else "raw"
        self.check()
        super().__post_init__(**kwargs)

    def _derive(self) -> None:
        """Fill the derived fields (head_dim, step weights, layer types) from the others."""
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.trm_step_weights is None and self.trm_max_steps >= 0:
            if self.trm_max_steps == len(DEFAULT_STEP_WEIGHTS) - 1:
                self.trm_step_weights = list(DEFAULT_STEP_WEIGHTS)
            else:
                steps = self.trm_max_steps
                self.trm_step_weights = [round(0.33 + (1.0 - 0.33) * t / max(steps, 1), 4) for t in range(steps + 1)]
        derived = [
            "hybrid_sliding" if self.layer_has_memory(index) else "sliding_attention"
            for index in range(self.num_hidden_layers)
        ]
        # A value this method derived earlier follows the fields it came from (e.g. memory_type changed after
        # loading); a value the user set must already be the derived one: it only names the cache layout.
        user_set = self.layer_types is not None and self.layer_types != getattr(self, "_derived_layer_types", None)
        if user_set and list(self.layer_types) != derived:
            raise ValueError(
                f"ForgeConfig.layer_types is {self.layer_types}, but memory_type={self.memory_type!r} with "
                f"memory_layers={self.memory_layers} and num_hidden_layers={self.num_hidden_layers} needs {derived}. "
                "Fix: leave layer_types unset; it is derived from memory_type, memory_layers and num_hidden_layers."
            )
        self.layer_types = derived
        self._derived_layer_types = list(derived)

    def layer_has_memory(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has the memory branch and MAG gate (`memory_type`, `memory_layers`)."""
        if self.memory_type == "none":
            return False
        return self.memory_layers is None or layer_idx in self.memory_layers

    @property
    def detach_between_steps(self) -> bool:
        """`trm_detach_between_steps`, or by default: detach when deep supervision is on (the specification)."""
        if self.trm_detach_between_steps is None:
            return self.deep_supervision
        return self.trm_detach_between_steps

    def check(self) -> None:
        """Derive the dependent fields, then raise a `ValueError` naming the first invalid field and the fix.

        Model construction calls it too, so fields overridden after loading (`from_pretrained(..., **overrides)`)
        are validated and derived fields follow them (pass `trm_step_weights=None` to re-derive the weights).
        """
        self._derive()

        def fail(field: str, problem: str, fix: str) -> None:
            raise ValueError(f"ForgeConfig.{field} {problem}. Fix: {fix}.")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                fail(name, f"must be a positive integer, got {getattr(self, name)}", f"set {name} >= 1")
        if self.hidden_size % self.num_attention_heads != 0:
            fail(
                "hidden_size",
                f"({self.hidden_size}) is not divisible by num_attention_heads ({self.num_attention_heads})",
                "choose num_attention_heads that divides hidden_size",
            )
        if self.head_dim % 2 != 0:
            fail("head_dim", f"must be even for rotary embeddings, got {self.head_dim}", "use an even head size")
        if self.layer_input_scales is not None and (
            len(self.layer_input_scales) != self.num_hidden_layers
            or not all(isinstance(v, (int, float)) and 0.0 < v < float("inf") for v in self.layer_input_scales)
        ):
            fail(
                "layer_input_scales",
                f"must hold one positive finite factor per layer ({self.num_hidden_layers}), got "
                f"{self.layer_input_scales}",
                "give num_hidden_layers positive numbers, or None for no scaling",
            )
        if self.sliding_window <= 0:
            fail("sliding_window", f"must be >= 1, got {self.sliding_window}", "set a positive window, e.g. 1024")
        if self.max_position_embeddings <= 0:
            fail("max_position_embeddings", "must be >= 1", "set the training sequence length, e.g. 2048")
        if self.memory_type not in MEMORY_TYPES:
            fail("memory_type", f"is {self.memory_type!r}", f"use one of {MEMORY_TYPES}")
        if self.memory_layers is not None:
            layers = list(self.memory_layers)
            if self.memory_type == "none":
                fail("memory_layers", f"is {layers} but memory_type is 'none'", "set memory_layers=None")
            in_range = all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in layers)
            if not layers or not in_range or layers != sorted(set(layers)):
                fail(
                    "memory_layers",
                    f"must be distinct increasing layer indices in [0, {self.num_hidden_layers}), got {layers}",
                    "list the 0-based layers that get the memory, e.g. [1, 3, 5, 7], or None for every layer",
                )
        for flag in ("memory_momentum", "memory_deep"):  # types: checked by the strict dataclass
            if getattr(self, flag) and self.memory_type != "neural":
                fail(flag, f"needs memory_type='neural', got {self.memory_type!r}", f"set {flag}=False")
        if self.memory_deep and self.memory_deep_expansion < 1:
            fail("memory_deep_expansion", f"must be >= 1, got {self.memory_deep_expansion}", "use 2")
        if self.memory_type != "none":
            if self.memory_size <= 0:
                fail("memory_size", f"must be >= 1, got {self.memory_size}", "set d_mem, e.g. hidden_size // 2")
            if self.memory_type == "neural":
                heads = self.memory_num_heads if self.memory_num_heads is not None else self.num_attention_heads
                if heads <= 0 or self.memory_size % heads != 0:
                    fail(
                        "memory_num_heads",
                        f"({heads}) must be positive and divide memory_size ({self.memory_size})",
                        "choose memory_num_heads that divides memory_size, or leave it unset",
                    )
                if not 0.0 < self.memory_forget_scale < float("inf"):
                    fail(
                        "memory_forget_scale", f"must be a positive number, got {self.memory_forget_scale}", "use 1.0"
                    )
                if self.memory_conv_size < 2:
                    fail("memory_conv_size", f"must be >= 2, got {self.memory_conv_size}", "use 4")
                if not 0.0 < self.memory_dt_min <= self.memory_dt_max:
                    fail(
                        "memory_dt_min",
                        f"and memory_dt_max must satisfy 0 < min <= max, got {self.memory_dt_min} and "
                        f"{self.memory_dt_max}",
                        "use 0.001 and 0.01",
                    )
            if not 0.0 < self.memory_decay < 1.0:
                fail("memory_decay", f"must lie strictly between 0 and 1, got {self.memory_decay}", "use e.g. 0.99")
            if self.memory_chunk_size <= 0:
                fail("memory_chunk_size", "must be >= 1", "use 64")
            if self.mag_mix not in MAG_MIXES:
                fail("mag_mix", f"is {self.mag_mix!r}", f"use one of {MAG_MIXES}")
            if self.gate_hidden_size <= 0:
                fail("gate_hidden_size", "must be >= 1", "set it, e.g. hidden_size // 2")
        if self.trm_max_steps < 0:
            fail("trm_max_steps", f"must be >= 0, got {self.trm_max_steps}", "use 0 (no refinement) or more")
        if self.trm_micro_steps < 1:
            fail("trm_micro_steps", f"must be >= 1, got {self.trm_micro_steps}", "use 2 as in the specification")
        if self.trm_cycles < 1:
            fail("trm_cycles", f"must be >= 1, got {self.trm_cycles}", "use 1 (one cycle, with gradient)")
        if self.trm_norm not in ("pre", "post", "post_latent"):
            fail("trm_norm", f"must be 'pre', 'post' or 'post_latent', got {self.trm_norm!r}", "use 'pre'")
        if not 0.0 <= self.act_exploration <= 1.0:
            fail("act_exploration", f"must lie in [0, 1], got {self.act_exploration}", "use e.g. 0.1")
        if self.trm_intermediate_size <= 0:
            fail("trm_intermediate_size", "must be >= 1", "use e.g. 2 * hidden_size")
        if len(self.trm_step_weights) != self.trm_max_steps + 1:
            fail(
                "trm_step_weights",
                f"has {len(self.trm_step_weights)} entries but trm_max_steps={self.trm_max_steps} needs "
                f"{self.trm_max_steps + 1} (one per y_0..y_T)",
                "give one weight per step or leave it unset for the default ramp",
            )
        if any(w < 0 for w in self.trm_step_weights) or sum(self.trm_step_weights) <= 0:
            fail("trm_step_weights", "must be non-negative with a positive sum", "e.g. [0.33, 0.5, 0.75, 1.0]")
        if self.trm_detach_between_steps and not self.deep_supervision:
            fail(
                "trm_detach_between_steps",
                "is True with deep_supervision=False, so only the final step's loss would train, and every step "
                "before it would get no training signal",
                "leave it unset or set it to False",
            )
        if not 0.0 < self.deep_supervision_fraction <= 1.0:
            fail("deep_supervision_fraction", f"must lie in (0, 1], got {self.deep_supervision_fraction}", "use 1.0")
        if self.act_target not in ("correct", "saturated"):
            fail("act_target", f"must be 'correct' or 'saturated', got {self.act_target!r}", "use 'saturated'")
        if self.act_saturation_margin < 0:
            fail("act_saturation_margin", f"must be >= 0, got {self.act_saturation_margin}", "use e.g. 0.003 (nats)")
        if not 0.0 < self.act_threshold < 1.0:
            fail("act_threshold", f"must lie strictly between 0 and 1, got {self.act_threshold}", "use e.g. 0.7")
        for name in ("act_loss_weight", "gate_entropy_weight", "attention_dropout"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0", f"set {name} to 0 to disable it")
        if self.bitnet is not None:
            from .bitnet import validate_bitnet_spec

            validate_bitnet_spec(self.bitnet, self.hidden_size)
        if self.thought_mixing_hidden_size is not None and (
            not isinstance(self.thought_mixing_hidden_size, int) or self.thought_mixing_hidden_size < 1
        ):
            fail(
                "thought_mixing_hidden_size",
                f"must be a positive integer or None, got {self.thought_mixing_hidden_size!r}",
                "use e.g. hidden_size // 2, or None for no thought mixing head",
            )

    def to_dict(self) -> dict:
        """The serialisable fields, without the bookkeeping of which `layer_types` was derived."""
        output = super().to_dict()
        output.pop("_derived_layer_types", None)
        return output

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "ForgeConfig":
        """Refuse checkpoints of another architecture instead of silently building a wrong model from them."""
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"This checkpoint has model_type {model_type!r}, not {cls.model_type!r}, so ForgeConfig cannot read "
                "it. Fix: load it with AutoModelForCausalLM (which picks the right class), or convert it to a Forge "
                "checkpoint first."
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ForgeConfig":
        """Build a config from a preset shipped with the package (`tiny`, `cognate-25m`), then apply overrides."""
        path = PRESETS_DIR / f"{name}.json"
        if not path.exists():
            raise ValueError(f"Unknown ForgeConfig preset {name!r}. Fix: use one of {available_presets()}.")
        values = json.loads(path.read_text())
        values.pop("_comment", None)
        values.update(overrides)
        return cls(**values)


__all__ = ["ForgeConfig", "available_presets"]
