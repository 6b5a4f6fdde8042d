"""Configuration of Phase 3 (Quiet-STaR): reasoning baking with thoughts, then REINFORCE on thoughts, mixing head."""

import os
from dataclasses import dataclass, field

from .baking_config import PromptBakingConfig
from .base import ForgeTrainingArguments
from .config_fields import check_own_field_types, json_field
from .teachers import TEACHERS

# Step 1's supervised baking defaults (a PromptBakingConfig): LoRA r 16 as for every bake, more steps than a prompt
# bake because it teaches a new output format (thought spans), and the thought tokens' embedding rows train too.
DEFAULT_REASONING_BAKE = {"steps": 200, "learning_rate": 2e-3, "batch_size": 16, "logging_steps": 20}


@dataclass
class QuietStarConfig(ForgeTrainingArguments):
    """Phase 3 settings. `output_dir` is the run folder: the result goes to `<output_dir>/phase3/`.

    The `TrainingArguments` fields (max_steps, per_device_train_batch_size, learning_rate, ...) configure step 2
    (the RL); step 1 (reasoning baking) is configured by `reasoning_bake`.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Input checkpoint: any Forge folder or Hub id (e.g. a Phase 2 champion)."}
    )
    task_family: str = field(default="arithmetic", metadata={"help": "Built-in task family to reason about."})
    difficulty: list | str | None = field(
        default=None, metadata={"help": "[min, max] task difficulty of training examples; default [1, 2]."}
    )
    eval_difficulty: int = field(default=1, metadata={"help": "Task difficulty of the before/after evaluation."})
    train_examples: int = field(default=512, metadata={"help": "Task examples for steps 1 and 2."})
    eval_examples: int = field(default=32, metadata={"help": "Validation examples for NLL and accuracy."})
    max_seq_length: int = field(default=256, metadata={"help": "Longest training sequence (tokens); longer dropped."})

    teacher: str = field(
        default="procedural", metadata={"help": f"Who writes the thoughts: one of {sorted(TEACHERS)}."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "teacher='model': a local causal LM folder."}
    )
    teacher_gguf_file: str | None = field(
        default=None, metadata={"help": "teacher='model': a GGUF file inside that folder (needs the gguf package)."}
    )
    teacher_base_url: str | None = field(
        default=None, metadata={"help": "teacher='openai': base URL of an OpenAI-compatible API (…/v1)."}
    )
    teacher_model: str | None = field(default=None, metadata={"help": "teacher='openai': the model name to ask."})
    teacher_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "teacher='openai': environment variable holding the API key."}
    )
    teacher_keep_incorrect: bool = field(
        default=False, metadata={"help": "Keep LM-teacher rationales that reach a wrong answer (default: drop)."}
    )

    reasoning_bake: dict | str | None = field(
        default=None,
        metadata={"help": f"Step 1 PromptBakingConfig fields (supervised baking); default {DEFAULT_REASONING_BAKE}."},
    )
    skip_reasoning_bake: bool = field(default=False, metadata={"help": "Skip step 1 (the input already thinks)."})
    reasoning_bake_plain_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Share of step-1 bake examples given without thoughts (the task's own target), so the bake "
            "keeps the model's thought-free answers; 0 bakes thought-laden examples only (measured in "
            "benchmarks/quietstar_base.py: 0.5 beat 0 on every answer metric)."
        },
    )

    n_thoughts: int = field(default=4, metadata={"help": "Thoughts sampled per position (REINFORCE group)."})
    thought_length: int = field(default=8, metadata={"help": "Most tokens per thought, between <think> and </think>."})
    n_true: int = field(default=4, metadata={"help": "True tokens after a position scored with each thought."})
    positions_per_sequence: int = field(
        default=4, metadata={"help": "Positions per training sequence that get thoughts (sampled from the answer)."}
    )
    thought_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of thoughts."})
    thought_early_end: bool = field(
        default=True,
        metadata={
            "help": "The model may close a thought before thought_length by sampling </think> (that choice is then "
            "part of the policy), as step 1's variable-length thoughts do; False: exactly thought_length tokens, "
            "</think> forced (the Quiet-STaR paper's fixed length)."
        },
    )
    reinforce_weight: float = field(default=1.0, metadata={"help": "Weight of the REINFORCE term on thoughts."})
    kl_weight: float = field(
        default=0.1,
        metadata={
            "help": "SPEC's Phase 3 'KL 0.1': weight of KL(step-1 model || current) on the no-thought next-token "
            "distributions, which keeps the RL from undoing what step 1 baked in. 0 disables the reference model."
        },
    )
    mixing_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden width of the mixing head; default hidden_size // 2."}
    )
    mixing_init_weight: float = field(
        default=0.3, metadata={"help": "Initial mixing weight w of a new head (bias of its output unit)."}
    )

    anti_theater_steps: int = field(
        default=25, metadata={"help": "Steps between anti-theater checks (0: only at the end)."}
    )
    anti_theater_examples: int = field(default=8, metadata={"help": "Validation sequences per anti-theater check."})
    min_ablation_gain: float = field(
        default=0.01,
        metadata={"help": "Ablating thoughts (random tokens) must raise the answer NLL by more than this (nats)."},
    )
    min_thought_gain: float = field(
        default=0.0,
        metadata={"help": "Thoughts must lower the answer NLL below the no-thought NLL by more than this (nats)."},
    )
    min_distinct_thoughts: float = field(
        default=0.25, metadata={"help": "Share of distinct thought strings below which thoughts count as collapsed."}
    )
    max_thought_repetition: float = field(
        default=0.6, metadata={"help": "Share of repeated tokens inside a thought above which it is degenerate."}
    )
    min_mixing_weight: float = field(
        default=0.02, metadata={"help": "Mean mixing weight below which thoughts count as ignored (pinned to 0)."}
    )
    eval_thought_length: int | None = field(
        default=None,
        metadata={"help": "Thought length at evaluation and in generate_with_thoughts; default as training."},
    )
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Generated tokens per evaluation answer."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing <output_dir>/phase3."})
    resume: bool = field(
        default=False,
        metadata={"help": "A finished <output_dir>/phase3 is kept and reported; an unfinished run starts over from "
                  "its input (steps 1 and 2 are short and seeded, so the result is the same)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_own_field_types(self, "QuietStarConfig")

        def fail(name: str, problem: str, fix: str) -> None:
            raise ValueError(f"QuietStarConfig.{name} {problem}. Fix: {fix}.")

        self.difficulty = json_field(self.difficulty, "QuietStarConfig", "difficulty") or [1, 2]
        bake = json_field(self.reasoning_bake, "QuietStarConfig", "reasoning_bake")
        if bake is not None and not isinstance(bake, dict):
            fail("reasoning_bake", f"is {bake!r}", "give a mapping of PromptBakingConfig fields, e.g. {steps: 150}")
        self.reasoning_bake = {**DEFAULT_REASONING_BAKE, **(bake or {})}
        try:  # validates the keys and values now, not after step 1
            PromptBakingConfig.from_dict(self.reasoning_bake)
        except (TypeError, ValueError) as error:
            raise ValueError(f"QuietStarConfig.reasoning_bake: {error}") from None
        if self.mugrokfast_phase is None and self.optimizer_type != "adamw":
            self.mugrokfast_phase = 3  # SPEC: lr 5e-4, lambda 0.1, tau 25
        if self.model_name_or_path is None:
            fail(
                "model_name_or_path",
                "is not set",
                "pass a Forge checkpoint folder, e.g. outputs/tiny/phase1/reasoning",
            )
        if not (
            isinstance(self.difficulty, list)
            and len(self.difficulty) == 2
            and 1 <= self.difficulty[0] <= self.difficulty[1] <= 10
        ):
            fail("difficulty", f"must be [min, max] within 1..10, got {self.difficulty}", "use e.g. [1, 2]")
        if not 0.0 <= self.reasoning_bake_plain_fraction < 1.0:
            fail("reasoning_bake_plain_fraction", f"is {self.reasoning_bake_plain_fraction}", "use a value in [0, 1)")
        if self.teacher not in TEACHERS:
            fail("teacher", f"is {self.teacher!r}", f"use one of {sorted(TEACHERS)}")
        if self.teacher == "model" and not self.teacher_model_name_or_path:
            fail("teacher_model_name_or_path", "is needed with teacher='model'", "name a local causal LM folder")
        if self.teacher == "openai" and not (self.teacher_base_url and self.teacher_model):
            fail("teacher_base_url", "and teacher_model are needed with teacher='openai'", "set both")
        for name in (
            "n_thoughts",
            "thought_length",
            "n_true",
            "positions_per_sequence",
            "train_examples",
            "eval_examples",
            "anti_theater_examples",
            "eval_max_new_tokens",
        ):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}", f"set {name} to a positive integer")
        if self.n_thoughts < 2 and self.reinforce_weight > 0:
            fail(
                "n_thoughts",
                "must be >= 2 for REINFORCE (the baseline is the mean over a position's thoughts)",
                "use 4, or reinforce_weight=0",
            )
        if not 0.0 < self.mixing_init_weight < 1.0:
            fail("mixing_init_weight", f"must lie in (0, 1), got {self.mixing_init_weight}", "use e.g. 0.3")
        if self.mixing_hidden_size is not None and self.mixing_hidden_size < 1:
            fail("mixing_hidden_size", "must be >= 1", "leave it unset for hidden_size // 2")
        for name in ("reinforce_weight", "kl_weight", "anti_theater_steps"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0", f"set {name} to 0 to disable it")
        if self.thought_temperature <= 0:
            fail("thought_temperature", "must be > 0", "use 1.0")
        if self.max_steps is None or self.max_steps <= 0:
            fail("max_steps", "must be set (> 0)", "give the number of RL steps, e.g. 100")
        if self.report_to in (None, "all") or "wandb" in (self.report_to or []):
            os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user chose a mode
        super().__post_init__()

    @property
    def reasoning_bake_config(self) -> PromptBakingConfig:
        """Step 1's baking settings."""
        return PromptBakingConfig.from_dict({"seed": self.seed, **self.reasoning_bake})


__all__ = ["DEFAULT_REASONING_BAKE", "QuietStarConfig"]
