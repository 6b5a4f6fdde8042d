"""MuGrokfast: Grokfast gradient filtering, Muon on hidden matrices, an AdamW fallback, QK-clip and an STE mode.

One `torch.optim.Optimizer` (one `state_dict`, so `Trainer` checkpoints and resumes it) whose step is:

1. Grokfast (Lee et al. 2024) on every gradient: `ema = alpha*ema + (1-alpha)*g; g <- g + lambda*ema` (the EMA
   starts at the first gradient, as in the paper's `gradfilter_ema`).
2. Muon (Jordan et al. 2024) on every >=2-D hidden weight: Nesterov momentum, 5 quintic Newton-Schulz steps on the
   normalised update (tall matrices are transposed so the iteration runs on the smaller Gram matrix; no shape is
   skipped), shape-aware lr scaling, decoupled weight decay.
3. AdamW (bias-corrected moments, decoupled weight decay: `torch.optim.adamw.adamw`, the functional form of
   `torch.optim.AdamW`) for embeddings / the tied LM head, norms, biases, the MAG gates and the ACT head.
4. QK-clip (MuonClip, Kimi K2 2025): every head whose largest pre-softmax logit in the last forward exceeded tau has
   its rows of W_q and W_k (and biases) scaled by sqrt(tau / max), so its logit is at most tau afterwards.
5. STE mode (BitNet phases): the optimizer updates the Parameters, i.e. the full-precision shadow weights of
   quantized layers, keeps all state (and, for bf16/fp16 shadows, an fp32 master copy) in fp32, and warns about
   trainable weights that got no gradient (a forward that used a detached quantized copy instead of an STE).

What comes from `torch.optim.Muon` (torch 2.13) and what is written here: the algorithm (Nesterov momentum in its
`lerp` form, the (a, b, c) quintic, `addmm` iteration, the "original" and "match_rms_adamw" lr adjustments, weight
decay `p *= 1 - lr*wd`) is torch's, and a test checks this optimizer against `torch.optim.Muon` step for step. Its
pieces are not reused as code because (a) `torch.optim.Muon` is one optimizer per parameter set with no hook for a
gradient filter, an AdamW group, metrics or QK-clip, (b) its Newton-Schulz helper and lr adjustment are private
(`torch.optim._muon._zeropower_via_newtonschulz`, `_adjust_lr`), and (c) that helper always runs in bfloat16, which
FACTS.md measured ~100x slower than fp32 on CPUs without bf16 matmul units (on a host with AMX it is ~3x faster) and
which STE mode must avoid. So `zeropower_via_newtonschulz` and `muon_lr_scale` below are small hand-written
equivalents with a selectable dtype (fp32 by default).
"""

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from torch.optim.adamw import adamw
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
LR_SCALINGS = ("match_rms_adamw", "original")
NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# >=2-D parameters that still belong to the AdamW fallback (SPEC: embeddings, LM head, gates; the ACT head; the neural
# memory's depthwise conv taps, a (channels, taps) table rather than a linear map).
DEFAULT_FALLBACK_PATTERNS = (
    r"(^|\.)embed_tokens\.",
    r"(^|\.)lm_head\.",
    r"(^|\.)gate\.",
    r"(^|\.)act_head\.",
    r"(^|\.)memory\.conv_weight$",
    r"(^|\.)memory\.deep_w[12]$",  # the deep memory's per-head initial weights (3-D stacks, `memory_deep`)
)
# Attention projections QK-clip rescales: `...layers.{i}.self_attn.q_proj` / `k_proj`.
QK_MODULE_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj)$")


# ----------------------------------------------------------------------------------------------------------------
# Configuration and phase presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MuGrokfastConfig:
    """Hyper-parameters of MuGrokfast; the defaults are the Phase 1 preset (`for_phase(1)`)."""

    lr: float = field(
        default=1e-3,
        metadata={
            "help": "Learning rate of the Muon group. With lr_scaling='match_rms_adamw' Muon's update RMS matches "
            "AdamW's, so this is on the AdamW scale (SPEC presets: P1 1e-3, P3/P5 5e-4, P6 1e-4)."
        },
    )
    fallback_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the AdamW fallback group; None uses `lr`."}
    )
    weight_decay: float = field(
        default=0.1, metadata={"help": "Decoupled weight decay of the Muon group: p <- p * (1 - lr * weight_decay)."}
    )
    fallback_weight_decay: float = field(
        default=0.1,
        metadata={
            "help": "Decoupled weight decay of the >=2-D fallback parameters (embeddings, gate and ACT weights); "
            "1-D parameters (norms, biases) are never decayed."
        },
    )
    momentum: float = field(default=0.95, metadata={"help": "Muon momentum coefficient."})
    nesterov: bool = field(default=True, metadata={"help": "Use Nesterov momentum in the Muon group."})
    ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations per Muon update."})
    ns_coefficients: tuple[float, float, float] = field(
        default=NS_COEFFICIENTS, metadata={"help": "Quintic Newton-Schulz coefficients (a, b, c)."}
    )
    ns_dtype: str = field(
        default="float32",
        metadata={
            "help": "Precision of the Newton-Schulz matmuls: 'float32' (safe on every CPU) or 'bfloat16' (torch's "
            "choice; fast on GPUs and bf16-capable CPUs, ~100x slower on CPUs without bf16 units). STE mode "
            "requires float32."
        },
    )
    lr_scaling: str = field(
        default="match_rms_adamw",
        metadata={
            "help": "Per-matrix lr scaling of the orthogonalised update: 'match_rms_adamw' (lr * 0.2 * "
            "sqrt(max(rows, cols)): update RMS 0.2 like AdamW, so AdamW's lr and weight decay transfer; Moonlight) "
            "or 'original' (lr * sqrt(max(1, rows/cols)); Keller Jordan's, needs a ~20x larger lr)."
        },
    )
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW fallback (beta1, beta2)."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW fallback epsilon."})
    grokfast_alpha: float = field(
        default=0.98, metadata={"help": "Grokfast EMA decay alpha in ema <- alpha*ema + (1-alpha)*g."}
    )
    grokfast_lambda: float = field(
        default=0.3,
        metadata={"help": "Grokfast amplification lambda in g <- g + lambda*ema; 0 turns the filter off."},
    )
    qk_clip_tau: float | None = field(
        default=30.0,
        metadata={"help": "QK-clip threshold tau on the max pre-softmax attention logit per head; None turns it off."},
    )
    qk_clip_interval: int = field(
        default=1,
        metadata={
            "help": "Trainers ask the model for attention logits (an extra QK matmul) every this many optimizer "
            "steps; QK-clip runs on those steps."
        },
    )
    ste_mode: bool = field(
        default=False,
        metadata={
            "help": "Quantized (BitLinear) training: state and math in fp32 (an fp32 master copy for bf16/fp16 "
            "shadow weights), and a warning for trainable weights that received no gradient."
        },
    )
    metrics_interval: int = field(
        default=50,
        metadata={
            "help": "Every this many steps compute the sampled health metrics (optim/ortho_error, "
            "optim/effective_rank); optim/grad_ema_ratio and optim/qk_clip_count are computed every step."
        },
    )
    fallback_patterns: tuple[str, ...] = field(
        default=DEFAULT_FALLBACK_PATTERNS,
        metadata={
            "help": "Regexes on parameter names that send >=2-D parameters to AdamW instead of Muon (embeddings, "
            "LM head, MAG gate MLP, ACT head, the neural memory's conv taps and deep-memory weights). 1-D parameters "
            "and nn.Embedding weights always go to AdamW."
        },
    )

    def __post_init__(self) -> None:
        self.ns_coefficients = tuple(float(c) for c in self.ns_coefficients)
        self.betas = tuple(float(b) for b in self.betas)
        self.fallback_patterns = tuple(self.fallback_patterns)
        checks = [
            (self.lr > 0, "lr", f"must be > 0, got {self.lr}", "use e.g. 1e-3"),
            (self.fallback_lr is None or self.fallback_lr > 0, "fallback_lr", "must be > 0", "use None or e.g. 1e-4"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0", "use e.g. 0.1"),
            (self.fallback_weight_decay >= 0, "fallback_weight_decay", "must be >= 0", "use e.g. 0.1"),
            (0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}", "use 0.95"),
            (1 <= self.ns_steps < 100, "ns_steps", f"must be in [1, 99], got {self.ns_steps}", "use 5"),
            (len(self.ns_coefficients) == 3, "ns_coefficients", "must hold three numbers", f"use {NS_COEFFICIENTS}"),
            (self.ns_dtype in NS_DTYPES, "ns_dtype", f"is {self.ns_dtype!r}", f"use one of {tuple(NS_DTYPES)}"),
            (self.lr_scaling in LR_SCALINGS, "lr_scaling", f"is {self.lr_scaling!r}", f"use one of {LR_SCALINGS}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)",
             "use (0.9, 0.95)"),
            (self.eps > 0, "eps", "must be > 0", "use 1e-8"),
            (0 <= self.grokfast_alpha < 1, "grokfast_alpha", f"must be in [0, 1), got {self.grokfast_alpha}",
             "use 0.98"),
            (self.grokfast_lambda >= 0, "grokfast_lambda", f"must be >= 0, got {self.grokfast_lambda}",
             "use 0 (off) to 5; SPEC presets use 0.1-2.0"),
            (self.qk_clip_tau is None or self.qk_clip_tau > 0, "qk_clip_tau", f"must be > 0, got {self.qk_clip_tau}",
             "use e.g. 30, or None to turn QK-clip off"),
            (self.qk_clip_interval >= 1, "qk_clip_interval", "must be >= 1", "use 1 (every step)"),
            (self.metrics_interval >= 1, "metrics_interval", "must be >= 1", "use e.g. 50"),
            (not (self.ste_mode and self.ns_dtype != "float32"), "ns_dtype",
             f"is {self.ns_dtype!r} with ste_mode=True", "use ns_dtype='float32' (STE mode keeps fp32 math)"),
        ]  # fmt: skip
        for ok, name, problem, fix in checks:
            if not ok:
                raise ValueError(f"MuGrokfastConfig.{name} {problem}. Fix: {fix}.")
        for pattern in self.fallback_patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"MuGrokfastConfig.fallback_patterns has an invalid regex {pattern!r} ({error}). "
                    "Fix: escape it or remove it."
                ) from error

    @property
    def resolved_fallback_lr(self) -> float:
        """The AdamW group's learning rate (`fallback_lr`, else `lr`)."""
        return self.lr if self.fallback_lr is None else self.fallback_lr

    @classmethod
    def for_phase(cls, phase: int, **overrides) -> "MuGrokfastConfig":
        """The SPEC preset of a training phase (1, 3, 5, 6, 7), with `overrides` applied on top."""
        if phase not in PHASE_PRESETS:
            raise ValueError(
                f"No MuGrokfast preset for phase {phase!r}. Fix: use one of {sorted(PHASE_PRESETS)} (phase 2 merges "
                "without training; phase 4 has no SPEC preset: build MuGrokfastConfig(..., ste_mode=True) yourself)."
            )
        return cls(**{**PHASE_PRESETS[phase], **overrides})

    def to_dict(self) -> dict:
        """Plain-dict form for model cards and lineage files."""
        return asdict(self)


# SPEC "MuGrokfast optimizer" presets; unspecified fields keep the class defaults (tau 30, wd 0.1, alpha 0.98).
# Phase 3's "KL 0.1" is the prompt-baking loss weight, a Phase 3 trainer setting, so it is not an optimizer field.
PHASE_PRESETS: dict[int, dict] = {
    1: {"lr": 1e-3, "grokfast_lambda": 0.3, "qk_clip_tau": 30.0},
    3: {"lr": 5e-4, "grokfast_lambda": 0.1, "qk_clip_tau": 25.0},
    5: {"lr": 5e-4, "fallback_lr": 1e-4, "grokfast_lambda": 2.0, "qk_clip_tau": 25.0, "ste_mode": True},
    # SPEC gives lr and lambda only. STE mode stays on (not in SPEC): Phase 6 trains the same ternary model as P5.
    6: {"lr": 1e-4, "grokfast_lambda": 0.2, "qk_clip_tau": 25.0, "ste_mode": True},
    # Not in SPEC (our choice): edge-deployment fine-tuning of the packed ternary model, i.e. short, gentle updates
    # of the shadow weights: a 2x lower lr than P6, the mild lambda of P3, the stricter tau 25, STE on.
    7: {"lr": 5e-5, "grokfast_lambda": 0.1, "qk_clip_tau": 25.0, "ste_mode": True},
}


# ----------------------------------------------------------------------------------------------------------------
# Muon pieces
# ----------------------------------------------------------------------------------------------------------------


def zeropower_via_newtonschulz(
    matrix: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of `matrix` (2-D, any shape) with the quintic Newton-Schulz iteration.

    Same iteration as `torch.optim.Muon` (normalise by the Frobenius norm so the spectral norm is <= 1, then
    `X <- a X + (b A + c A^2) X` with `A = X X^T`) but in `dtype` (torch hard-codes bfloat16). A tall matrix is
    transposed so `A` is the smaller Gram matrix. After 5 steps every singular value that started above ~3e-3 of the
    Frobenius norm lies in about [0.68, 1.2]; smaller ones (near-null directions) stay below.
    """
    if matrix.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a 2-D matrix, got shape {tuple(matrix.shape)}. Fix: reshape first.")
    a, b, c = coefficients
    x = matrix.to(dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (n, n), n = min(rows, cols)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if transposed else x


def muon_lr_scale(shape: torch.Size | tuple[int, ...], scaling: str) -> float:
    """Factor on the lr for the orthogonal update of a (rows, cols...) matrix; see `MuGrokfastConfig.lr_scaling`."""
    rows, cols = shape[0], math.prod(shape[1:])
    if scaling == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if scaling == "original":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"Unknown lr_scaling {scaling!r}. Fix: use one of {LR_SCALINGS}.")


def orthogonality_error(update: torch.Tensor) -> float:
    """||U U^T - I||_F / sqrt(n) of a Newton-Schulz output, n = min(rows, cols): 0 for an exactly orthogonal U."""
    u = update if update.shape[0] <= update.shape[1] else update.T
    u = u.float()
    eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
    return float(torch.linalg.matrix_norm(u @ u.T - eye) / math.sqrt(u.shape[0]))


def relative_effective_rank(update: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) / min(rows, cols): 1 for a flat spectrum, 1/n for rank one."""
    singular = torch.linalg.svdvals(update.float())
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular / total
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return float(torch.exp(entropy) / singular.numel())


# ----------------------------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class QKPair:
    """The query and key projection parameters of one attention layer (what QK-clip rescales)."""

    layer: int
    q_weight: nn.Parameter
    k_weight: nn.Parameter
    q_bias: nn.Parameter | None = None
    k_bias: nn.Parameter | None = None


def unwrap_optimizer(optimizer: object) -> object:
    """The optimizer behind wrappers such as accelerate's `AcceleratedOptimizer` (which keep it in `.optimizer`)."""
    while not isinstance(optimizer, MuGrokfast) and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


class MuGrokfast(torch.optim.Optimizer):
    """Grokfast-filtered Muon (>=2-D hidden weights) + AdamW (everything else) with QK-clip; build it with
    `create_mugrokfast(model, config)`. Each param group has `kind` "muon" or "adamw"."""

    def __init__(
        self,
        params: Iterable[dict],
        config: MuGrokfastConfig,
        qk_pairs: list[QKPair] | None = None,
        param_names: dict[int, str] | None = None,
    ) -> None:
        defaults = {
            "kind": "muon",
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "momentum": config.momentum,
            "nesterov": config.nesterov,
            "ns_steps": config.ns_steps,
            "ns_coefficients": config.ns_coefficients,
            "ns_dtype": config.ns_dtype,
            "ns_eps": 1e-7,
            "lr_scaling": config.lr_scaling,
            "betas": config.betas,
            "eps": config.eps,
            "grokfast_alpha": config.grokfast_alpha,
            "grokfast_lambda": config.grokfast_lambda,
            "ste_mode": config.ste_mode,
            "step_count": 0,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["kind"] not in ("muon", "adamw"):
                raise ValueError(f"Param group kind {group['kind']!r} is unknown. Fix: use 'muon' or 'adamw'.")
        self.config = config
        self.qk_pairs = list(qk_pairs or [])
        self.param_names = dict(param_names or {})
        self.last_metrics: dict[str, float] = {}
        self.qk_total_heads: int | None = None  # layers * heads, known once logits were recorded
        self._pending_logit_max: torch.Tensor | None = None
        self._warned_missing_grads = False

    # -- QK-clip --------------------------------------------------------------------------------------------------

    @property
    def qk_clip_enabled(self) -> bool:
        """Whether QK-clip is on (a tau is set and the q/k projections are known)."""
        return self.config.qk_clip_tau is not None and bool(self.qk_pairs)

    def record_attention_logit_max(self, logit_max: torch.Tensor) -> None:
        """Remember a forward's (layers, heads) max attention logits (max over micro-batches) for the next step."""
        if not self.qk_pairs:
            raise ValueError(
                "record_attention_logit_max was called but this optimizer knows no q/k projections. Fix: build it "
                "with create_mugrokfast and qk_clip_tau set, on a model with `layers.{i}.self_attn.q_proj/k_proj`."
            )
        logit_max = logit_max.detach().float()
        if logit_max.ndim != 2 or logit_max.shape[0] != len(self.qk_pairs):
            raise ValueError(
                f"attention_logit_max has shape {tuple(logit_max.shape)}, expected ({len(self.qk_pairs)}, heads): one "
                "row per attention layer. Fix: pass the model output's `attention_logit_max`."
            )
        self.qk_total_heads = logit_max.numel()
        if self._pending_logit_max is None:
            self._pending_logit_max = logit_max.clone()
        else:
            self._pending_logit_max = torch.maximum(self._pending_logit_max, logit_max.to(self._pending_logit_max))

    @torch.no_grad()
    def apply_qk_clip(self, logit_max: torch.Tensor) -> int:
        """Scale W_q, W_k rows (and biases) of heads whose max logit > tau by sqrt(tau / max); returns how many."""
        tau = self.config.qk_clip_tau
        if tau is None:
            return 0
        clipped = 0
        for pair, row in zip(self.qk_pairs, logit_max.float(), strict=True):
            over = torch.isfinite(row) & (row > tau)
            if not bool(over.any()):
                continue
            scale = torch.where(over, torch.sqrt(tau / row.clamp(min=tau)), torch.ones_like(row))  # (H,)
            for param in (pair.q_weight, pair.k_weight, pair.q_bias, pair.k_bias):
                if param is not None:
                    self._scale_head_rows(param, scale)
            clipped += int(over.sum())
        return clipped

    def _scale_head_rows(self, param: torch.Tensor, scale: torch.Tensor) -> None:
        """Multiply the output rows of each head (contiguous blocks of rows) of a q/k weight or bias by `scale`."""
        heads = scale.numel()
        if param.shape[0] % heads:
            raise ValueError(
                f"A q/k projection has {param.shape[0]} output rows, not divisible by {heads} heads. Fix: QK-clip "
                "needs each head's rows contiguous in the projection's output dimension."
            )
        target = self.state[param].get("master", param)
        view = target.view(heads, target.shape[0] // heads, *target.shape[1:])
        view.mul_(scale.to(target).view(heads, *([1] * (view.ndim - 1))))
        if target is not param:
            param.copy_(target)

    # -- the step -------------------------------------------------------------------------------------------------

    def _working_tensor(self, param: torch.Tensor, group: dict) -> torch.Tensor:
        """The tensor updated in place: the parameter, or in STE mode its fp32 master copy for bf16/fp16 params."""
        state = self.state[param]
        if group["ste_mode"] and param.dtype != torch.float32 and "master" not in state:
            state["master"] = param.detach().float().clone()
        return state.get("master", param)

    def _filtered_grad(self, param: torch.Tensor, group: dict, norms: list[torch.Tensor]) -> torch.Tensor:
        """Grokfast: `ema = alpha*ema + (1-alpha)*g; g + lambda*ema` (EMA starts at the first gradient)."""
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError("MuGrokfast does not support sparse gradients. Fix: use dense embeddings.")
        if group["ste_mode"]:
            grad = grad.float()
        lam = group["grokfast_lambda"]
        if lam == 0:
            return grad
        state = self.state[param]
        ema = state.get("grokfast_ema")
        if ema is None:
            ema = state["grokfast_ema"] = grad.detach().clone(memory_format=torch.preserve_format)
        else:
            ema.mul_(group["grokfast_alpha"]).add_(grad, alpha=1.0 - group["grokfast_alpha"])
        filtered = grad.add(ema, alpha=lam)
        norms.append(torch.stack([grad.float().norm(), filtered.float().norm()]))
        return filtered

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Grokfast filter, then Muon / AdamW updates per group, then QK-clip from the recorded logits."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step_count = self.param_groups[0]["step_count"]
        sample = step_count % self.config.metrics_interval == 0
        norms: list[torch.Tensor] = []
        ortho_errors: list[float] = []
        ranks: list[float] = []
        missing: list[str] = []
        for group in self.param_groups:
            group["step_count"] += 1
            with_grad = [p for p in group["params"] if p.grad is not None]
            if group["ste_mode"] and not self._warned_missing_grads:
                missing += [
                    self.param_names.get(id(p), str(tuple(p.shape))) for p in group["params"] if p.grad is None
                ]
            if group["kind"] == "muon":
                self._muon_group(group, with_grad, norms, ortho_errors if sample else None, ranks if sample else None)
            else:
                self._adamw_group(group, with_grad, norms)

        metrics: dict[str, float] = {}
        if norms:
            raw, filtered = torch.stack(norms).pow(2).sum(0).sqrt().tolist()
            if raw > 0:
                metrics["optim/grad_ema_ratio"] = filtered / raw
        if self.qk_clip_enabled:
            clipped = 0
            if self._pending_logit_max is not None:
                logit_max = self._pending_logit_max
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # Every rank must clip identically or the replicas drift apart.
                    torch.distributed.all_reduce(logit_max, op=torch.distributed.ReduceOp.MAX)
                clipped = self.apply_qk_clip(logit_max)
            metrics["optim/qk_clip_count"] = float(clipped)
            self._pending_logit_max = None
        if ortho_errors:
            metrics["optim/ortho_error"] = sum(ortho_errors) / len(ortho_errors)
            metrics["optim/effective_rank"] = sum(ranks) / len(ranks)
        self.last_metrics = metrics
        if missing:
            self._warned_missing_grads = True
            logger.warning(
                f"STE mode: {len(missing)} trainable parameter(s) got no gradient this step: {missing[:8]}. Fix: the "
                "quantized forward must use a straight-through estimator (w + (q(w) - w).detach()) on the shadow "
                "weight, not a detached quantized copy."
            )
        return loss

    def _muon_group(
        self,
        group: dict,
        params: list[torch.Tensor],
        norms: list[torch.Tensor],
        ortho_errors: list[float] | None,
        ranks: list[float] | None,
    ) -> None:
        """Nesterov momentum, Newton-Schulz orthogonalisation, decoupled weight decay and a shape-scaled step."""
        lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        ns_dtype = NS_DTYPES[group["ns_dtype"]]
        for param in params:
            grad = self._filtered_grad(param, group, norms)
            work = self._working_tensor(param, group)
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            matrix = update.reshape(update.shape[0], -1)  # (rows, cols): >2-D weights flattened, none skipped
            ortho = zeropower_via_newtonschulz(
                matrix, group["ns_steps"], group["ns_coefficients"], group["ns_eps"], ns_dtype
            )
            if ortho_errors is not None and ranks is not None:
                ortho_errors.append(orthogonality_error(ortho))
                ranks.append(relative_effective_rank(ortho))
            work.mul_(1 - lr * weight_decay)
            work.add_(ortho.view_as(work).to(work.dtype), alpha=-lr * muon_lr_scale(matrix.shape, group["lr_scaling"]))
            if work is not param:
                param.copy_(work)

    def _adamw_group(self, group: dict, params: list[torch.Tensor], norms: list[torch.Tensor]) -> None:
        """Real AdamW via `torch.optim.adamw.adamw` (bias-corrected moments, decoupled weight decay)."""
        works, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for param in params:
            grad = self._filtered_grad(param, group, norms)
            work = self._working_tensor(param, group)
            state = self.state[param]
            if "step" not in state:  # the same state layout as torch.optim.AdamW
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(work, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(work, memory_format=torch.preserve_format)
            works.append(work)
            grads.append(grad.to(work.dtype))
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not works:
            return
        beta1, beta2 = group["betas"]
        adamw(
            works,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        for param, work in zip(params, works, strict=True):
            if work is not param:
                param.copy_(work)

    def load_state_dict(self, state_dict: dict) -> None:
        """`Optimizer.load_state_dict`, except that STE-mode state stays fp32 for low-precision params (torch would
        cast every state tensor to the parameter's dtype, rounding the fp32 master copy and moments to bf16)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        for saved_id, (param, group) in zip(saved_ids, params, strict=True):
            if not group["ste_mode"] or param.dtype == torch.float32:
                continue
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)


# ----------------------------------------------------------------------------------------------------------------
# Building it from a model
# ----------------------------------------------------------------------------------------------------------------


def split_parameters(model: nn.Module, config: MuGrokfastConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Assign every trainable parameter to exactly one of "muon", "adamw" (decayed) or "adamw_no_decay".

    Muon: >=2-D weights not owned by an nn.Embedding and not matching `config.fallback_patterns`. AdamW: the rest;
    1-D parameters (norms, biases) without weight decay. A tied parameter is assigned once (its first owner).
    """
    patterns = [re.compile(p) for p in config.fallback_patterns]
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": [], "adamw_no_decay": []}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not param.requires_grad:
                continue  # frozen (e.g. quantized-only copies): never updated, never orthogonalised
            name = f"{module_name}.{param_name}" if module_name else param_name
            if param.ndim < 2:
                groups["adamw_no_decay"].append((name, param))
            elif isinstance(module, nn.Embedding) or any(p.search(name) for p in patterns):
                groups["adamw"].append((name, param))
            else:
                groups["muon"].append((name, param))
    return groups


def find_qk_pairs(model: nn.Module) -> list[QKPair]:
    """The q/k projections of every attention layer, ordered by layer index (`...layers.{i}.self_attn.q_proj`)."""
    found: dict[int, dict[str, nn.Module]] = {}
    for name, module in model.named_modules():
        match = QK_MODULE_PATTERN.search(name)
        if match:
            layer = found.setdefault(int(match.group(1)), {})
            if match.group(2) in layer:
                raise ValueError(f"Two modules claim layer {match.group(1)}'s {match.group(2)} (second: {name}).")
            layer[match.group(2)] = module
    if sorted(found) != list(range(len(found))) or any(len(v) != 2 for v in found.values()):
        raise ValueError(
            f"Attention layers {sorted(found)} do not each have both q_proj and k_proj, numbered from 0. Fix: name "
            "them `layers.{i}.self_attn.q_proj/k_proj` or turn QK-clip off (qk_clip_tau=None)."
        )
    pairs = []
    for layer in range(len(found)):
        q, k = found[layer]["q_proj"], found[layer]["k_proj"]
        pairs.append(QKPair(layer, q.weight, k.weight, getattr(q, "bias", None), getattr(k, "bias", None)))
    return pairs


def create_mugrokfast(model: nn.Module, config: MuGrokfastConfig | None = None) -> MuGrokfast:
    """One MuGrokfast optimizer over `model`'s trainable parameters (groups as in `split_parameters`)."""
    config = config or MuGrokfastConfig()
    for name, param in model.named_parameters():
        if param.requires_grad and not param.is_floating_point():
            raise ValueError(f"Parameter {name} has dtype {param.dtype}. Fix: freeze it (requires_grad=False).")
    split = split_parameters(model, config)
    fallback = {"lr": config.resolved_fallback_lr, "kind": "adamw"}
    specs = {
        "muon": {"kind": "muon"},
        "adamw": {**fallback, "weight_decay": config.fallback_weight_decay},
        "adamw_no_decay": {**fallback, "weight_decay": 0.0},
    }
    param_groups = [
        {"params": [p for _, p in split[name]], "name": name, **specs[name]} for name in specs if split[name]
    ]
    if not param_groups:
        raise ValueError("The model has no trainable parameters. Fix: unfreeze some before building the optimizer.")
    qk_pairs = []
    if config.qk_clip_tau is not None:
        qk_pairs = find_qk_pairs(model)
        if not qk_pairs:
            raise ValueError(
                f"QK-clip is on (qk_clip_tau={config.qk_clip_tau}) but the model has no attention modules named "
                "`layers.{i}.self_attn.q_proj` / `k_proj`. Fix: set qk_clip_tau=None, or name the projections so."
            )
        trainable = {id(p) for _, group in split.items() for _, p in group}
        for pair in qk_pairs:
            if id(pair.q_weight) not in trainable or id(pair.k_weight) not in trainable:
                raise ValueError(
                    f"QK-clip: layer {pair.layer}'s q/k weights are frozen. Fix: unfreeze them or set "
                    "qk_clip_tau=None."
                )
    names = {id(p): n for group in split.values() for n, p in group}
    return MuGrokfast(param_groups, config, qk_pairs=qk_pairs, param_names=names)


def muon_only(config: MuGrokfastConfig) -> MuGrokfastConfig:
    """The same config as plain Muon + AdamW fallback: Grokfast and QK-clip off (the ablation baseline)."""
    return replace(config, grokfast_lambda=0.0, qk_clip_tau=None)


# ----------------------------------------------------------------------------------------------------------------
# Health monitor
# ----------------------------------------------------------------------------------------------------------------


class MuGrokfastCallback(TrainerCallback):
    """Logs the optimizer's `optim/*` health metrics and warns (once per excursion) when one leaves its range.

    Ranges (our thresholds; SPEC names the monitors, not numbers):
      - `optim/ortho_error` <= 0.6: with every singular value in the quintic's band [0.68, 1.2] the error is at most
        ~0.54; more means a share of directions was not orthogonalised (rank-deficient updates, NS in low precision).
      - `optim/grad_ema_ratio` <= 1 + 2*lambda: above it the EMA is over twice the current gradient's norm, so stale
        gradient history dominates the step (Grokfast over-amplification).
      - `optim/effective_rank` >= 0.3 (relative to min(rows, cols)): below it the updates collapsed to few directions.
      - `optim/qk_clip_count` <= 50% of heads: clipping most heads every step means the lr is too high for tau.

    With `sink` (ForgeTrainer passes its `_metrics["train"]`) the values are appended there and averaged into every
    `log()`; without it, they are added to the `logs` dict of the next `on_log`.
    """

    def __init__(
        self,
        sink: dict[str, list[float]] | None = None,
        max_ortho_error: float = 0.6,
        max_grad_ema_ratio: float | None = None,
        min_effective_rank: float = 0.3,
        max_qk_clip_fraction: float = 0.5,
    ) -> None:
        self.sink = sink
        self.max_ortho_error = max_ortho_error
        self.max_grad_ema_ratio = max_grad_ema_ratio
        self.min_effective_rank = min_effective_rank
        self.max_qk_clip_fraction = max_qk_clip_fraction
        self._pending: dict[str, list[float]] = {}
        self._alarmed: set[str] = set()

    def check(
        self, metrics: dict[str, float], grokfast_lambda: float = 0.3, total_heads: int | None = None
    ) -> list[str]:
        """Warn about metrics outside their range (once until they return); returns the names out of range now."""
        limits = {
            "optim/ortho_error": (-math.inf, self.max_ortho_error),
            "optim/effective_rank": (self.min_effective_rank, math.inf),
            "optim/grad_ema_ratio": (
                0.0,
                self.max_grad_ema_ratio if self.max_grad_ema_ratio is not None else 1.0 + 2.0 * grokfast_lambda,
            ),
        }
        if total_heads:
            limits["optim/qk_clip_count"] = (-math.inf, self.max_qk_clip_fraction * total_heads)
        out = []
        for name, value in metrics.items():
            if name not in limits:
                continue
            low, high = limits[name]
            if math.isfinite(value) and low <= value <= high:
                self._alarmed.discard(name)
                continue
            out.append(name)
            if name not in self._alarmed:
                self._alarmed.add(name)
                logger.warning(f"MuGrokfast health: {name}={value:.4g} is outside [{low:.4g}, {high:.4g}].")
        return out

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        inner = unwrap_optimizer(optimizer)
        if not isinstance(inner, MuGrokfast):
            return
        metrics = dict(inner.last_metrics)
        self.check(metrics, inner.config.grokfast_lambda, inner.qk_total_heads)
        target = self.sink if self.sink is not None else self._pending
        for name, value in metrics.items():
            target.setdefault(name, []).append(value)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sink is None and logs is not None and self._pending:
            logs.update({name: sum(v) / len(v) for name, v in self._pending.items() if v})
            self._pending.clear()


__all__ = [
    "DEFAULT_FALLBACK_PATTERNS",
    "PHASE_PRESETS",
    "MuGrokfast",
    "MuGrokfastCallback",
    "MuGrokfastConfig",
    "QKPair",
    "create_mugrokfast",
    "find_qk_pairs",
    "muon_lr_scale",
    "muon_only",
    "orthogonality_error",
    "relative_effective_rank",
    "split_parameters",
    "unwrap_optimizer",
    "zeropower_via_newtonschulz",
]
