"""Configuration of prompt baking (Phases 3, 5 and 6): distil a prompted model into LoRA weights without the prompt.

Teacher = the base model (LoRA adapters disabled) with the prompt in context; student = the same model with LoRA
enabled and without the prompt. A bake minimises per-token KL(teacher || student) over continuations sampled from
the teacher (Bhargava et al., "Prompt Baking", 2024). Half-baking runs half the steps; `stack` repeats a (half-)bake,
merging between rounds, so N half-bakes approach full strength (1 - 0.5^N); `pursuit_rounds` re-bakes the prompt
into the already baked model (the teacher is then the baked model with the prompt), pushing past the prompt itself.
"""

from dataclasses import asdict, dataclass, field, fields

# The attention and MLP projections of a Forge decoder layer (also the TRM refiner's and the memory's projections,
# which share the names); the same names cover Llama-style Hub models.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_KINDS = ("merged", "adapter")


@dataclass
class PromptBakingConfig:
    """Settings of one `bake_prompt` call; every field has a default, so `PromptBakingConfig()` is a full bake."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the student adapters (SPEC: 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={
            "help": "Module-name suffixes that get LoRA adapters (peft matching). The default hits every "
            "attention, MLP, neural-memory and TRM-refiner projection of a Forge model (Llama-style names on Hub "
            "models); list full paths such as `layers.0.self_attn.q_proj` to narrow it."
        },
    )
    trainable_token_indices: list[int] | None = field(
        default=None,
        metadata={
            "help": "Embedding rows trained next to the adapters (peft `trainable_token_indices`), e.g. newly added "
            "thought tokens; merged back into the (tied) embedding with the adapters."
        },
    )
    steps: int = field(default=100, metadata={"help": "Optimizer steps of one full bake."})
    fraction: float = field(
        default=1.0, metadata={"help": "Share of `steps` each bake runs: 1.0 a full bake, 0.5 a half-bake."}
    )
    stack: int = field(
        default=1,
        metadata={
            "help": "Bake this many rounds against the same teacher, merging the adapters between rounds; with "
            "fraction=0.5 the nominal strength after N rounds is 1 - 0.5^N."
        },
    )
    pursuit_rounds: int = field(
        default=0,
        metadata={
            "help": "Prompt pursuit: extra full bakes whose teacher is the already baked model with the prompt, so "
            "the prompt's effect is amplified beyond the prompt itself."
        },
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the LoRA weights."})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": "Trainer scheduler; constant by default, so a half-bake is the first half of a full bake."},
    )
    batch_size: int = field(default=16, metadata={"help": "Teacher continuations per optimizer step."})
    num_samples: int = field(
        default=128, metadata={"help": "Continuations sampled from the teacher to train on (spread over inputs)."}
    )
    eval_samples: int = field(
        default=32, metadata={"help": "Held-out teacher continuations on which the KL before/after is measured."}
    )
    max_new_tokens: int = field(default=24, metadata={"help": "Length of each sampled continuation (tokens)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the teacher."})
    top_k_logits: int = field(
        default=128,
        metadata={
            "help": "Keep the teacher's top-K log-probs per position plus one tail bucket (an exact lower bound of "
            "the full KL); 0 keeps the full vocabulary (exact KL)."
        },
    )
    separator: str = field(default="", metadata={"help": "Text put between the prompt and each input."})
    output: str = field(
        default="merged",
        metadata={"help": "'merged' returns the model with the adapters merged in; 'adapter' the PeftModel."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling, LoRA initialisation and data order."})
    logging_steps: int = field(default=10, metadata={"help": "Steps between logged KL values."})
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "Trainer `report_to` backends of the bake (none by default)."}
    )

    def __post_init__(self) -> None:
        def fail(name: str, problem: str, fix: str) -> None:
            raise ValueError(f"PromptBakingConfig.{name} {problem}. Fix: {fix}.")

        for name in ("lora_r", "steps", "stack", "batch_size", "num_samples", "eval_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}", f"set {name} to a positive integer")
        if not 0.0 < self.fraction <= 1.0:
            fail("fraction", f"must lie in (0, 1], got {self.fraction}", "use 1.0 (full bake) or 0.5 (half-bake)")
        if self.pursuit_rounds < 0:
            fail("pursuit_rounds", "must be >= 0", "use 0 (no pursuit) or more")
        if self.temperature <= 0:
            fail("temperature", f"must be > 0, got {self.temperature}", "use 1.0 to sample the teacher as it is")
        if self.top_k_logits < 0:
            fail("top_k_logits", "must be >= 0", "use 0 for the full vocabulary or e.g. 128")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}", "use 0.0")
        if self.learning_rate <= 0:
            fail("learning_rate", "must be > 0", "use e.g. 2e-3")
        if self.output not in OUTPUT_KINDS:
            fail("output", f"is {self.output!r}", f"use one of {OUTPUT_KINDS}")
        if self.output == "adapter" and (self.stack > 1 or self.pursuit_rounds > 0):
            fail(
                "output",
                "is 'adapter' but several rounds are asked for (stack > 1 or pursuit_rounds > 0), whose earlier "
                "adapters are merged into the base",
                "use output='merged' for stacked or pursued bakes",
            )
        if not self.lora_target_modules:
            fail("lora_target_modules", "is empty", f"use e.g. {list(DEFAULT_LORA_TARGETS)}")

    @property
    def round_steps(self) -> int:
        """Optimizer steps of each stacked round: `fraction` of a full bake, at least one."""
        return max(1, round(self.steps * self.fraction))

    @property
    def nominal_strength(self) -> float:
        """The strength the spec expects from `stack` bakes of `fraction` each: 1 - (1 - fraction)^stack."""
        return 1.0 - (1.0 - self.fraction) ** self.stack

    @classmethod
    def from_dict(cls, values: dict | None) -> "PromptBakingConfig":
        """Build from a (YAML) mapping, refusing unknown keys with the list of known ones."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"PromptBakingConfig got unknown keys {unknown}. Fix: use only {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain-dict form for lineage files and model cards."""
        return asdict(self)


__all__ = ["DEFAULT_LORA_TARGETS", "OUTPUT_KINDS", "PromptBakingConfig"]
