"""Configuration of Phase 2 (EvoMerge): evolutionary search over merge recipes of the three Phase 1 models.

A plain dataclass (the phase does not train, so no `TrainingArguments`); `recipes/phase2.py` parses it with
`TrlParser` from YAML and the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config_fields import check_own_field_types, json_field
from .tracking import requested_backends

# Parts of the composite fitness and their default weights (normalised to sum 1 when used). Each part is "higher is
# better" and relative to the best parent on that metric: perplexity best/candidate, answer-token probability
# candidate/best, speed (FLOPs per token best/candidate, or timed tokens/s), parameter bytes best/candidate; task
# accuracy is used as is (a fraction, and every tiny parent scores about 0 on it).
DEFAULT_FITNESS_WEIGHTS = {
    "perplexity": 0.4,
    "task_accuracy": 0.1,
    "task_likelihood": 0.2,
    "speed": 0.15,
    "memory": 0.15,
}
FITNESS_PARTS = tuple(DEFAULT_FITNESS_WEIGHTS)
DEFAULT_PARENTS = ("reasoning", "memory", "speed")


@dataclass
class EvoMergeConfig:
    """Phase 2 settings. `output_dir` is the run folder: results go to `<output_dir>/phase2/`."""

    output_dir: str = field(
        default="outputs/tiny", metadata={"help": "Run folder; Phase 2 writes <output_dir>/phase2/."}
    )
    phase1_dir: str | None = field(
        default=None, metadata={"help": "Phase 1 results folder; default <output_dir>/phase1."}
    )
    parents: list[str] | None = field(
        default=None,
        metadata={"help": "Parent checkpoint folders; default <phase1_dir>/{reasoning,memory,speed}."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Common ancestor for task vectors; default: found in the parents' forge_lineage.json."},
    )
    population_size: int = field(
        default=8, metadata={"help": "Candidates per generation (the first are the 8 combos)."}
    )
    generations: int = field(default=50, metadata={"help": "Most generations evaluated (generation 0 included)."})
    elites: int = field(default=2, metadata={"help": "Best candidates carried unchanged into the next generation."})
    patience: int = field(
        default=5, metadata={"help": "Stop after this many generations without a best-fitness gain > threshold."}
    )
    plateau_threshold: float = field(
        default=0.001, metadata={"help": "Smallest best-fitness gain that counts as progress."}
    )
    mutation_rate: float = field(default=0.3, metadata={"help": "Probability that a gene group mutates."})
    mutation_scale: float = field(default=0.15, metadata={"help": "Standard deviation of numeric mutations."})
    diversity_threshold: float = field(
        default=0.05,
        metadata={"help": "Mean pairwise genome distance in [0, 1] below which the population counts as collapsed."},
    )
    reinject_fraction: float = field(
        default=0.5,
        metadata={"help": "Share of the non-elite slots filled with fresh random genomes after a collapse."},
    )
    max_path_length: int | None = field(
        default=None, metadata={"help": "Longest DFS layer path; default twice the parents' layer count."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the search (each generation derives its own)."})
    fitness_weights: dict | str | None = field(
        default=None,
        metadata={"help": f"Weights of the fitness parts {list(FITNESS_PARTS)}; default {DEFAULT_FITNESS_WEIGHTS}."},
    )
    eval_tokens: int = field(default=4096, metadata={"help": "Validation-corpus tokens scored for perplexity."})
    eval_seq_len: int = field(default=256, metadata={"help": "Window length of the perplexity evaluation."})
    task_families: list[str] = field(
        default_factory=lambda: ["arithmetic", "kv_recall"],
        metadata={"help": "Phase 1 task families scored by the harness (answer likelihood and greedy match)."},
    )
    task_examples: int = field(default=32, metadata={"help": "Validation examples per task family."})
    task_difficulty: int = field(default=1, metadata={"help": "Difficulty of the task examples (1-10)."})
    task_accuracy_metric: str = field(
        default="greedy_target",
        metadata={
            "help": "task_accuracy part: 'greedy_target' (teacher-forced: every target token is the greedy choice; "
            "cheap, but an arithmetic target's worked text must match word for word) or 'exact_match' (greedy "
            "generation scored as the evaluation scores it: the extracted answer equals the reference)."
        },
    )
    task_max_new_tokens: int = field(
        default=48, metadata={"help": "Generation budget per task example under task_accuracy_metric=exact_match."}
    )
    speed_metric: str = field(
        default="flops",
        metadata={
            "help": "Speed part of the fitness: 'flops' (forward FLOPs per token on held-out text, deterministic) or "
            "'measured' (wall-clock tokens/s timed beside the fastest parent; noisy on a shared machine)."
        },
    )
    speed_batch_size: int = field(default=4, metadata={"help": "Sequences in the timed forward pass."})
    speed_seq_len: int = field(default=128, metadata={"help": "Tokens per sequence in the timed forward pass."})
    speed_repeats: int = field(default=3, metadata={"help": "Timed repeats; the fastest counts (least noise)."})
    final_eval_tokens: int = field(
        default=16384, metadata={"help": "Test-corpus tokens for the final champion-versus-parents comparison."}
    )
    final_task_examples: int = field(
        default=64, metadata={"help": "Test examples per task family for the final comparison."}
    )
    keep_best_parent: bool = field(
        default=True,
        metadata={
            "help": "Hand on the best parent unchanged when no merge beats it on validation fitness (the card and "
            "metrics say so), so Phase 2 never makes the pipeline worse; False hands on the best merge regardless."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted search from its last generation."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing Phase 2 result."})
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar per generation."})
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Where each generation's fitness is logged, as Trainer's report_to: trackio, wandb, none."},
    )
    project: str = field(default="huggingface", metadata={"help": "Tracking project name (TrainingArguments')."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to upload the champion to."})

    def __post_init__(self) -> None:
        check_own_field_types(self, "EvoMergeConfig")
        weights = json_field(self.fitness_weights, "EvoMergeConfig", "fitness_weights")
        weights = dict(DEFAULT_FITNESS_WEIGHTS) if weights is None else dict(weights)
        unknown = sorted(set(weights) - set(FITNESS_PARTS))
        if unknown:
            raise ValueError(
                f"EvoMergeConfig.fitness_weights has unknown parts {unknown}. Fix: use {list(FITNESS_PARTS)}."
            )
        if any(not isinstance(v, (int, float)) or v < 0 for v in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(
                f"EvoMergeConfig.fitness_weights={weights} must be non-negative with a positive sum. "
                "Fix: e.g. {perplexity: 0.4, task_likelihood: 0.2, ...}."
            )
        self.fitness_weights = {part: float(weights.get(part, 0.0)) for part in FITNESS_PARTS}
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        try:
            requested_backends(self.report_to, strict=True)
        except ValueError as error:
            raise ValueError(f"EvoMergeConfig.{error}") from None

        def positive(name: str) -> None:
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise ValueError(f"EvoMergeConfig.{name} must be >= 1, got {getattr(self, name)}. Fix: set it >= 1.")

        for name in (
            "population_size",
            "generations",
            "patience",
            "eval_tokens",
            "eval_seq_len",
            "task_examples",
            "speed_batch_size",
            "speed_seq_len",
            "speed_repeats",
            "final_eval_tokens",
            "final_task_examples",
            "task_max_new_tokens",
        ):
            positive(name)  # fmt: skip
        if not 0 <= self.elites < self.population_size:
            raise ValueError(
                f"EvoMergeConfig.elites={self.elites} must lie in [0, population_size={self.population_size}). "
                "Fix: keep a few (2) elites and room for new candidates."
            )
        if self.population_size < 2:
            raise ValueError("EvoMergeConfig.population_size must be >= 2. Fix: use 8 (the 2x2x2 initial combos).")
        for name in ("mutation_rate", "reinject_fraction", "diversity_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"EvoMergeConfig.{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.mutation_scale <= 0:
            raise ValueError(f"EvoMergeConfig.mutation_scale must be > 0, got {self.mutation_scale}. Fix: use 0.15.")
        if self.plateau_threshold < 0:
            raise ValueError("EvoMergeConfig.plateau_threshold must be >= 0. Fix: use 0.001.")
        if self.max_path_length is not None and self.max_path_length < 1:
            raise ValueError("EvoMergeConfig.max_path_length must be >= 1 or unset (twice the layer count).")
        if self.speed_metric not in ("flops", "measured"):
            raise ValueError(f"EvoMergeConfig.speed_metric is {self.speed_metric!r}. Fix: use 'flops' or 'measured'.")
        if self.task_accuracy_metric not in ("greedy_target", "exact_match"):
            raise ValueError(f"EvoMergeConfig.task_accuracy_metric is {self.task_accuracy_metric!r}. Fix: use "
                             "'greedy_target' or 'exact_match'.")  # fmt: skip
        if not 1 <= self.task_difficulty <= 10:
            raise ValueError(f"EvoMergeConfig.task_difficulty must lie in [1, 10], got {self.task_difficulty}.")
        if self.parents is not None and len(self.parents) < 2:
            raise ValueError("EvoMergeConfig.parents must name at least two checkpoints (Phase 1 gives three).")
        if self.resume and self.overwrite:
            raise ValueError("EvoMergeConfig: resume and overwrite exclude each other. Fix: pass one of them.")
        from evaluation.tasks import TASK_FAMILIES

        for family in self.task_families:
            if family not in TASK_FAMILIES:
                raise ValueError(
                    f"EvoMergeConfig.task_families has unknown family {family!r}. Fix: use {sorted(TASK_FAMILIES)}."
                )

    @property
    def phase1_path(self) -> Path:
        """Where the Phase 1 results are."""
        return Path(self.phase1_dir) if self.phase1_dir else Path(self.output_dir) / "phase1"

    @property
    def phase_dir(self) -> Path:
        """Where Phase 2 writes (`<output_dir>/phase2`)."""
        return Path(self.output_dir) / "phase2"

    def parent_paths(self) -> list[str]:
        """The parent checkpoint folders."""
        if self.parents:
            return [str(p) for p in self.parents]
        return [str(self.phase1_path / name) for name in DEFAULT_PARENTS]


__all__ = ["DEFAULT_FITNESS_WEIGHTS", "DEFAULT_PARENTS", "EvoMergeConfig", "FITNESS_PARTS"]
