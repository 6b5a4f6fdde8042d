"""Configuration of Phase 4 (BitNet b1.58): layer-by-layer ternary quantization with fallback, then STE fine-tuning.

Fields left unset (`None`, or `max_steps=-1`) take the model-size-aware defaults of `trainers.size_aware` once the
input model's parameter count is known (`resolve_size_defaults`); an explicit value always wins.
"""

from dataclasses import dataclass, field

from modeling_forge.bitnet import EMBEDDING_BITS, KERNEL_CHOICES, QUANTIZABLE_GROUPS

from .base import ForgeTrainingArguments
from .config_fields import check_own_field_types, json_field
from .data import TASK_SOURCES
from .size_aware import SizeDefaults

DEFAULT_MIXTURE = {"corpus": 0.5, "arithmetic": 0.25, "kv_recall": 0.25}


@dataclass
class BitNetConfig(ForgeTrainingArguments):
    """Phase 4 settings. `output_dir` is the phase folder itself (e.g. `outputs/<run>/phase4`); the Trainer's own
    checkpoints go to a hidden sibling `.<name>-work/`."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The previous phase's output: a local folder or a Hub id (required)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; default: model_name_or_path."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per calibration, training and evaluation block."})
    data_mixture: dict | str | None = field(
        default=None,
        metadata={
            "help": "Source -> weight for calibration and fine-tuning data: 'corpus', a task family "
            f"({', '.join(TASK_SOURCES)}), 'hub:<name>' or 'file:<path>'. Default: {DEFAULT_MIXTURE}."
        },
    )
    task_difficulty: list | str | None = field(
        default=None, metadata={"help": "[min, max] difficulty of task-family examples; default [1, 3]."}
    )
    calibration_blocks: int = field(
        default=8, metadata={"help": "Training-split blocks the layer-by-layer validation measures the loss on."}
    )
    quantize_groups: list | str | None = field(
        default=None,
        metadata={"help": f"Linear groups made ternary, any of {list(QUANTIZABLE_GROUPS)}; default: all of them."},
    )
    keep_full_precision: list | str | None = field(
        default=None,
        metadata={"help": "Backbone-relative module names never quantized (e.g. 'layers.0.self_attn.q_proj')."},
    )
    layerwise_validation: bool = field(
        default=True,
        metadata={"help": "Quantize one layer at a time and keep sensitive layers in full precision (else: all)."},
    )
    sensitivity_threshold: float | None = field(
        default=None,
        metadata={
            "help": "A layer falls back to full precision when quantizing it raises the calibration loss by more "
            "than this fraction (0.05 = 5 percent) over the loss before it. Default: size-aware."
        },
    )
    compression_target: float | None = field(
        default=None,
        metadata={
            "help": "Whole-checkpoint size ratio vs fp32 to reach; picks the embedding's storage bits when "
            "embedding_bits is unset (the highest precision that meets it). Default: size-aware."
        },
    )
    activation_bits: int = field(default=8, metadata={"help": "Bits of the per-token absmax activations (2-8)."})
    embedding_bits: int | None = field(
        default=None,
        metadata={
            "help": f"Storage bits of the tied embedding / LM head, one of {EMBEDDING_BITS}; default: chosen from "
            "compression_target."
        },
    )
    embedding_group_size: int = field(
        default=64,
        metadata={"help": "Columns per fp16 scale of an 8-/4-bit embedding (a divisor of hidden_size)."},
    )
    distill_weight: float = field(
        default=0.5,
        metadata={
            "help": "Weight alpha of the distillation term: loss = (1 - alpha) * model loss + alpha * T^2 * "
            "KL(full-precision teacher || student) on the final logits; 0 trains on the labels only."
        },
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the distillation."})
    eval_blocks: int = field(
        default=16, metadata={"help": "Validation blocks per data source for loss and next-token accuracy."}
    )
    eval_tokens: int = field(default=20_000, metadata={"help": "Validation tokens of the rolling corpus perplexity."})
    speed_new_tokens: int = field(
        default=32, metadata={"help": "Tokens generated per decode-speed measurement (fp32 vs packed); 0 skips it."}
    )
    kernel: str = field(
        default="auto",
        metadata={
            "help": f"Matmul of the packed layers during evaluation, one of {KERNEL_CHOICES} (same outputs; "
            "'auto': the fastest available)."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing phase folder at output_dir instead of refusing."}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "A finished output_dir is kept and reported; an unfinished run continues from the newest "
                  "complete STE checkpoint in its work folder (.<output_dir name>-work), redoing the deterministic "
                  "quantization first."},
    )  # fmt: skip
    # Phase 4 defaults of inherited fields.
    max_steps: int = field(
        default=-1, metadata={"help": "STE fine-tuning optimizer steps; -1: size-aware (0: quantize only)."}
    )
    ste_mode: bool | None = field(
        default=True, metadata={"help": "MuGrokfast STE mode (updates the BitLinear shadow weights); must be on."}
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Blocks per device per step."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule of the fine-tuning."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a fraction < 1 of max_steps)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    save_strategy: str = field(default="no", metadata={"help": "Trainer checkpoints during fine-tuning ('no')."})

    def __post_init__(self) -> None:
        check_own_field_types(self, "BitNetConfig")
        self.data_mixture = json_field(self.data_mixture, "BitNetConfig", "data_mixture") or dict(DEFAULT_MIXTURE)
        self.task_difficulty = list(json_field(self.task_difficulty, "BitNetConfig", "task_difficulty") or [1, 3])
        self.quantize_groups = list(
            json_field(self.quantize_groups, "BitNetConfig", "quantize_groups") or QUANTIZABLE_GROUPS
        )
        self.keep_full_precision = list(
            json_field(self.keep_full_precision, "BitNetConfig", "keep_full_precision") or []
        )
        self._explicit_lr = self.learning_rate is not None  # the size-aware lr applies only when none was given
        checks = [
            (self.model_name_or_path, "model_name_or_path", "is required",
             "pass the previous phase's folder or Hub id, e.g. --model_name_or_path outputs/run/phase3"),
            (self.block_size >= 8, "block_size", f"must be >= 8, got {self.block_size}", "use e.g. 128"),
            (self.calibration_blocks >= 1, "calibration_blocks", "must be >= 1", "use e.g. 8"),
            (self.eval_blocks >= 1, "eval_blocks", "must be >= 1", "use e.g. 16"),
            (self.eval_tokens >= 2, "eval_tokens", "must be >= 2", "use e.g. 20000"),
            (self.speed_new_tokens >= 0, "speed_new_tokens", "must be >= 0", "use 32, or 0 to skip"),
            (isinstance(self.data_mixture, dict) and self.data_mixture
             and all(w >= 0 for w in self.data_mixture.values()) and sum(self.data_mixture.values()) > 0,
             "data_mixture", "must map sources to non-negative weights with a positive sum",
             f"e.g. {DEFAULT_MIXTURE}"),
            (all(s == "corpus" or s in TASK_SOURCES or s.startswith(("hub:", "file:")) for s in self.data_mixture),
             "data_mixture", f"has unknown sources {sorted(self.data_mixture)}",
             f"use 'corpus', {', '.join(TASK_SOURCES)}, 'hub:<name>' or 'file:<path>'"),
            (len(self.task_difficulty) == 2 and 1 <= self.task_difficulty[0] <= self.task_difficulty[1] <= 10,
             "task_difficulty", f"is {self.task_difficulty}", "use [min, max] with 1 <= min <= max <= 10"),
            (set(self.quantize_groups) <= set(QUANTIZABLE_GROUPS) and self.quantize_groups, "quantize_groups",
             f"is {self.quantize_groups}", f"use a non-empty subset of {list(QUANTIZABLE_GROUPS)}"),
            (self.sensitivity_threshold is None or self.sensitivity_threshold >= 0, "sensitivity_threshold",
             "must be >= 0", "use e.g. 0.05, or set layerwise_validation=false to quantize every layer"),
            (self.compression_target is None or self.compression_target >= 1, "compression_target",
             "must be >= 1", "use e.g. 8.0"),
            (2 <= self.activation_bits <= 8, "activation_bits", f"is {self.activation_bits}", "use 8 (BitNet)"),
            (self.embedding_bits is None or self.embedding_bits in EMBEDDING_BITS, "embedding_bits",
             f"is {self.embedding_bits}", f"use one of {EMBEDDING_BITS} or leave it unset"),
            (self.embedding_group_size >= 1, "embedding_group_size", "must be >= 1", "use a divisor of hidden_size"),
            (0.0 <= self.distill_weight <= 1.0, "distill_weight", f"is {self.distill_weight}", "use one in [0, 1]"),
            (self.distill_temperature > 0, "distill_temperature", "must be > 0", "use 1.0"),
            (self.kernel in KERNEL_CHOICES, "kernel", f"is {self.kernel!r}", f"use one of {KERNEL_CHOICES}"),
            (self.max_steps >= -1, "max_steps", f"is {self.max_steps}", "use -1 (size-aware), 0 or a step count"),
            (self.ste_mode or self.optimizer_type == "adamw", "ste_mode", "is off",
             "leave it on: the optimizer must update the shadow weights of the ternary layers"),
        ]  # fmt: skip
        for ok, name, problem, fix in checks:
            if not ok:
                raise ValueError(f"BitNetConfig.{name} {problem}. Fix: {fix}.")
        super().__post_init__()

    def resolve_size_defaults(self, defaults: SizeDefaults) -> dict:
        """Fill the unset size-dependent fields from `defaults` (explicit values win); returns what was filled."""
        filled = {}
        if self.sensitivity_threshold is None:
            filled["sensitivity_threshold"] = defaults.bitnet_sensitivity_threshold
        if self.compression_target is None:
            filled["compression_target"] = defaults.bitnet_compression_target
        if self.max_steps == -1:
            filled["max_steps"] = defaults.bitnet_finetune_steps
        if not self._explicit_lr and self.optimizer_type != "adamw":
            filled["learning_rate"] = defaults.bitnet_learning_rate
        for name, value in filled.items():
            setattr(self, name, value)
        return filled


__all__ = ["DEFAULT_MIXTURE", "BitNetConfig"]
