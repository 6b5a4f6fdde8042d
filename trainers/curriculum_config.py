"""Configuration of Phase 5 (curriculum): edge-of-ability placement, the per-level code loop with a sandboxed tool,
hints and variants, then per level prompt bakes, self-modeling and dream consolidation, on a ternary model (STE)."""

from dataclasses import dataclass, field

from .baking_config import PromptBakingConfig
from .base import ForgeTrainingArguments
from .config_fields import json_field
from .teachers import TEACHERS

TASK_SAMPLING = ("lilo", "uniform")
POOL_SAMPLING = ("stratified", "random")
SOLUTION_FORMATS = ("prefix", "comment")
THINKING = ("auto", "on", "off")
DREAM_FILTERS = ("verified", "none")
DREAM_LEVELS = ("all", "earlier")

# The texts baked after each level (overridable in the YAML). Written for this project.
DEFAULT_BAKE_PROMPTS = {
    "eudaimonia": (
        "Act so that people and other beings can flourish: be honest, do no harm, respect autonomy, and when a "
        "request conflicts with these, say so plainly and help in a way that does not."
    ),
    "ooda": (
        "Work in OODA loops: observe what the task and the tests say, orient by naming what is known and unknown, "
        "decide on one small next step, act, then check the result before the next loop."
    ),
    "identity": (
        "You are Forge, a small recursive-memory language model trained by Agent Forge. You think before you "
        "write code, you test it, and you say when you are unsure."
    ),
}
# The bakes' defaults: half-bakes (SPEC: prompt baking with fraction 0.5) with a short budget; YAML `bake` overrides.
DEFAULT_BAKE = {"fraction": 0.5, "steps": 40, "num_samples": 64, "eval_samples": 16, "max_new_tokens": 24}


@dataclass
class CurriculumConfig(ForgeTrainingArguments):
    """Phase 5 settings. `output_dir` is the phase folder itself (e.g. `outputs/<run>/phase5`); finished levels are
    checkpointed in a hidden sibling `.<name>-work/level-<n>/`, from which `--resume` continues."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The previous phase's output (Phase 4's ternary folder, or any Forge folder); required."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; default: model_name_or_path."}
    )
    # -- placement --------------------------------------------------------------------------------------------------
    levels: list | str | None = field(
        default=None, metadata={"help": "[first, last] code levels (1-10) the curriculum may use; default [1, 10]."}
    )
    placement_problems: int = field(
        default=8, metadata={"help": "Held-out (validation split) problems per level measured before training."}
    )
    placement_k: int = field(default=4, metadata={"help": "Samples per problem for pass@k during placement."})
    placement_target: float = field(
        default=0.5,
        metadata={
            "help": "Start at the level whose measured pass@1 is closest to this (the edge of ability); ties go to "
            "the easier level."
        },
    )
    num_levels: int = field(
        default=10, metadata={"help": "Levels trained, from the placed level upwards (capped by `levels`)."}
    )
    # -- the per-level loop -----------------------------------------------------------------------------------------
    pool_size: int = field(default=64, metadata={"help": "Training-split tasks in each level's pool."})
    pool_sampling: str = field(
        default="stratified",
        metadata={
            "help": "How a level's pool is drawn from the training split: 'random' (the level's task draw as is; a "
            "small pool can miss some of the level's templates, which it then never trains) or 'stratified' "
            "(round-robin over the level's templates, so each gets an equal share, within one task)."
        },
    )
    attempts_per_round: int = field(
        default=32, metadata={"help": "Pool tasks attempted per round (sampled by `task_sampling`)."}
    )
    max_rounds: int = field(
        default=20, metadata={"help": "Round budget per level (a level also ends when its pool is mastered)."}
    )
    mastery_fraction: float = field(
        default=0.05,
        metadata={"help": "A level is mastered when its pool has shrunk to at most this share of its start size."},
    )
    successes_to_remove: int = field(
        default=3, metadata={"help": "Consecutive unaided successes on a task (and its variants) that remove it."}
    )
    hint_retries: int | None = field(
        default=None,
        metadata={
            "help": "Retries with the teacher's hint after a failed attempt (0: no hints); default: one per "
            "`hint_solution_fractions` entry, else 1."
        },
    )
    hint_solution_fractions: list | str | None = field(
        default=None,
        metadata={
            "help": "The hint ladder: per retry, the share of the teacher's solution body shown with the prose hint "
            "(QuestA-style partial solutions, arXiv 2507.13266), non-decreasing in [0, 1], e.g. [0.0, 0.5, 1.0]; "
            "default: 0 for every retry (prose hints only). Verified successes train without hint or solution "
            "in context."
        },
    )
    hint_solution_format: str = field(
        default="prefix",
        metadata={
            "help": "How a rung shows the partial solution: 'prefix' (the body's first part is written into the "
            "function for the model to continue; the program that runs and trains is that part plus the "
            "continuation) or 'comment' (comment lines above the function; the model writes the whole body)."
        },
    )
    variant_after_hinted_success: bool = field(
        default=False,
        metadata={
            "help": "Replace a task by a variant after a hinted success too (it still never counts towards "
            "removal), so the same instance is not trained on every round; useful with solution rungs."
        },
    )
    success_variants: int = field(
        default=0,
        metadata={
            "help": "Per verified success (unaided or hinted), up to this many variants of the task (same template, "
            "new constants) whose program is the success with its constants rewritten to the variant's and that "
            "pass the variant's tests in the sandbox are trained too (a program that does not copy its constants "
            "gives none): the round then teaches copying constants from the docstring, not one instance's values. "
            "0: off."
        },
    )
    experience_buffer: int = field(
        default=0,
        metadata={
            "help": "Each round with new verified pairs also trains on up to this many pairs drawn from the level's "
            "earlier rounds (successes, hinted successes, variants; never a hint in context), so what a round "
            "learned is not overwritten by the next few dozen instances. 0: only the round's own pairs."
        },
    )
    task_sampling: str = field(
        default="lilo",
        metadata={
            "help": "'lilo': attempt tasks with weight p(1-p) of their smoothed success rate (LILO, arXiv "
            "2502.12272; unseen tasks count as p=0.5); 'uniform'."
        },
    )
    teacher: str = field(
        default="procedural",
        metadata={"help": f"Who writes hints, one of {sorted(TEACHERS)} (procedural: offline, from the test run)."},
    )
    teacher_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments of the teacher (e.g. name_or_path, base_url, model)."}
    )
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of the model's attempts."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens the model may write per attempt."})
    thinking: str = field(
        default="auto",
        metadata={
            "help": "'on': each attempt starts with a thought span (<think>), stripped before the code runs; 'auto': "
            "on when the input has Phase 3's thought tokens and mixing head; 'off'."
        },
    )
    replay_share: float = field(
        default=0.25,
        metadata={"help": "Share of each round's training examples replayed from earlier levels' successes."},
    )
    train_epochs: float = field(
        default=2.0, metadata={"help": "Passes over a round's training examples (successes, hinted, replay)."}
    )
    max_length: int = field(default=256, metadata={"help": "Longest training sequence in tokens (longer are cut)."})
    eval_problems: int = field(
        default=16, metadata={"help": "Test-split problems per level for success before/after (greedy pass@1)."}
    )
    # -- sandbox ----------------------------------------------------------------------------------------------------
    sandbox_timeout_s: float = field(default=5.0, metadata={"help": "Wall-clock limit per program (s)."})
    sandbox_memory_mb: int = field(default=256, metadata={"help": "Address-space limit per program (MB)."})
    sandbox_workers: int | None = field(
        default=None, metadata={"help": "Programs run at once in the sandbox; default: the CPU count."}
    )
    require_isolation: bool = field(
        default=True,
        metadata={
            "help": "Refuse to run model-written code without bubblewrap (the phase stops with an error naming the "
            "fix); false accepts the weaker rlimits fallback with a warning."
        },
    )
    # -- after each level -------------------------------------------------------------------------------------------
    bake_prompts: dict | str | None = field(
        default=None,
        metadata={"help": "Name -> text baked after each level (half-bakes); default: eudaimonia, OODA, identity."},
    )
    bake: dict | str | None = field(
        default=None,
        metadata={"help": f"PromptBakingConfig fields of those bakes; default {DEFAULT_BAKE}. steps 0 skips baking."},
    )
    self_model_bands: list | str | None = field(
        default=None,
        metadata={
            "help": "[at the first level, at level 10] temperature bands of self-modeling, interpolated by level "
            "(SPEC: 10-19); default [10, 19]."
        },
    )
    self_model_temperatures: list | str | None = field(
        default=None, metadata={"help": "[lowest, highest] temperature spanned by the bands; default [0.1, 2.0]."}
    )
    self_model_samples: int = field(
        default=4, metadata={"help": "Generations per band to train on (plus as many held out to measure)."}
    )
    self_model_mask_rate: float = field(
        default=0.2, metadata={"help": "Share of each generation's tokens masked and predicted (SPEC: 0.2)."}
    )
    self_model_epochs: float = field(default=1.0, metadata={"help": "Passes over the self-modeling examples."})
    dreams: bool = field(default=True, metadata={"help": "Dream consolidation after each level."})
    dream_samples: int = field(
        default=256,
        metadata={
            "help": "Training-split tasks of the levels so far (split evenly over them) the model dreams about after "
            "each level; each gets `dream_samples_per_task` samples. 256 with 4 `dream_variants` (was 64 and 0): "
            "without cross-level replay the larger dream epoch turned L3's forgetting (BWT -0.29) into none "
            "(+0.13), and its dreams alone won back 0.115 of it in every seed (benchmarks/curriculum.py, 4 seeds)."
        },
    )
    dream_samples_per_task: int = field(
        default=4,
        metadata={
            "help": "Samples per dreamed task. With `dream_filter: verified` several samples give a task more chances "
            "to yield a passing program (distinct passing programs are all kept)."
        },
    )
    dream_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of the dreams (1.0 with verified dreams; the unfiltered dreams of "
            "`dream_filter: none` used 1.5)."
        },
    )
    dream_filter: str = field(
        default="verified",
        metadata={
            "help": "'verified': a dream trains only if its program passes its task's tests in the sandbox "
            "(DreamCoder's and STaR's filtering), duplicates dropped; 'none': every non-empty dream trains, "
            "unchecked (the earlier behaviour; measured in benchmarks/curriculum.py to raise held-out NLL and lower "
            "held-out success)."
        },
    )
    dream_levels: str = field(
        default="earlier",
        metadata={
            "help": "Whose tasks the dreams after a level replay: 'earlier' (only the levels before it: the "
            "consolidation of what came before, against forgetting; no dream after the first level) or 'all' (the "
            "levels trained so far, this one included)."
        },
    )
    dream_variants: int = field(
        default=4,
        metadata={
            "help": "With verified dreams, each kept dream also trains on up to this many variants of its task "
            "(constants rewritten, kept only if the variant's tests pass in the sandbox), as `success_variants` "
            "does in the loop. 0: off."
        },
    )
    dream_lr_scale: float = field(
        default=0.3,
        metadata={
            "help": "The dream epoch's learning rate as a share of `learning_rate`. The epoch is a few steps with a "
            "fresh optimizer state, whose first steps move every weight by about the learning rate whatever its "
            "gradient: at the loop's rate (1.0) it raised held-out NLL; measured in benchmarks/curriculum.py."
        },
    )
    dream_real_share: float = field(
        default=0.5,
        metadata={
            "help": "Share of the dream epoch that is real task data (reference solutions), so the model never "
            "trains on its own samples alone (Shumailov et al. 2024)."
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue from the last finished level in the work folder (.<name>-work)."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing phase folder at output_dir instead of refusing."}
    )
    # Phase 5 defaults of inherited fields.
    mugrokfast_phase: int | None = field(
        default=5, metadata={"help": "MuGrokfast preset (SPEC Phase 5: lr 5e-4, lambda 2.0, STE mode, QK-clip 25)."}
    )
    ste_mode: bool | None = field(
        default=True, metadata={"help": "MuGrokfast STE mode (updates the BitLinear shadow weights); keep it on."}
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per device per step."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Schedule within each training round."})
    logging_steps: float = field(default=5, metadata={"help": "Log every this many steps."})
    save_strategy: str = field(default="no", metadata={"help": "Trainer checkpoints within a round ('no')."})

    def __post_init__(self) -> None:
        owner = "CurriculumConfig"
        self.levels = list(json_field(self.levels, owner, "levels") or [1, 10])
        fractions = json_field(self.hint_solution_fractions, owner, "hint_solution_fractions")
        if fractions is not None and not isinstance(fractions, list | tuple):
            fractions = [fractions]
        if self.hint_retries is None:
            self.hint_retries = 1 if fractions is None else len(fractions)
        if fractions is None and isinstance(self.hint_retries, int) and self.hint_retries >= 0:
            fractions = [0.0] * self.hint_retries
        self.hint_solution_fractions = list(fractions or [])
        ladder = self.hint_solution_fractions
        ladder_ok = all(isinstance(f, int | float) and not isinstance(f, bool) and 0.0 <= f <= 1.0 for f in ladder) \
            and all(a <= b for a, b in zip(ladder, ladder[1:], strict=False))  # fmt: skip
        self.teacher_kwargs = dict(json_field(self.teacher_kwargs, owner, "teacher_kwargs") or {})
        prompts = json_field(self.bake_prompts, owner, "bake_prompts")
        self.bake_prompts = dict(DEFAULT_BAKE_PROMPTS if prompts is None else prompts)
        self.bake = {**DEFAULT_BAKE, **(json_field(self.bake, owner, "bake") or {})}
        self.self_model_bands = list(json_field(self.self_model_bands, owner, "self_model_bands") or [10, 19])
        temps = json_field(self.self_model_temperatures, owner, "self_model_temperatures")
        self.self_model_temperatures = [float(t) for t in (temps or [0.1, 2.0])]
        bake_steps = self.bake.get("steps", 1)
        checks = [
            (self.model_name_or_path, "model_name_or_path", "is required",
             "pass the previous phase's folder or Hub id, e.g. --model_name_or_path outputs/run/phase4"),
            (len(self.levels) == 2 and 1 <= self.levels[0] <= self.levels[1] <= 10, "levels", f"is {self.levels}",
             "use [first, last] with 1 <= first <= last <= 10"),
            (self.placement_problems >= 1, "placement_problems", "must be >= 1", "use e.g. 8"),
            (self.placement_k >= 1, "placement_k", "must be >= 1", "use e.g. 4"),
            (0.0 < self.placement_target < 1.0, "placement_target", f"is {self.placement_target}",
             "use a success rate in (0, 1), e.g. 0.5"),
            (self.num_levels >= 1, "num_levels", "must be >= 1", "use e.g. 3"),
            (self.pool_size >= 1, "pool_size", "must be >= 1", "use e.g. 64"),
            (self.pool_sampling in POOL_SAMPLING, "pool_sampling", f"is {self.pool_sampling!r}",
             f"use one of {POOL_SAMPLING}"),
            (self.attempts_per_round >= 1, "attempts_per_round", "must be >= 1", "use e.g. 32"),
            (self.max_rounds >= 1, "max_rounds", "must be >= 1", "use e.g. 20"),
            (0.0 <= self.mastery_fraction < 1.0, "mastery_fraction", f"is {self.mastery_fraction}",
             "use a share in [0, 1), e.g. 0.05"),
            (self.successes_to_remove >= 1, "successes_to_remove", "must be >= 1", "use 3 (SPEC)"),
            (self.hint_retries >= 0, "hint_retries", "must be >= 0", "use 1, or 0 for no hints"),
            (ladder_ok, "hint_solution_fractions", f"is {ladder}",
             "use non-decreasing shares in [0, 1], one per hint retry, e.g. [0.0, 0.5, 1.0]"),
            (len(ladder) == self.hint_retries, "hint_solution_fractions",
             f"has {len(ladder)} rungs but hint_retries is {self.hint_retries}",
             "give one fraction per retry, or leave hint_retries unset (it then follows the fractions)"),
            (self.hint_solution_format in SOLUTION_FORMATS, "hint_solution_format",
             f"is {self.hint_solution_format!r}", f"use one of {SOLUTION_FORMATS}"),
            (isinstance(self.success_variants, int) and self.success_variants >= 0, "success_variants",
             f"is {self.success_variants!r}", "use a count >= 0, e.g. 8, or 0 for none"),
            (isinstance(self.experience_buffer, int) and self.experience_buffer >= 0, "experience_buffer",
             f"is {self.experience_buffer!r}", "use a count >= 0, e.g. 400, or 0 for none"),
            (self.task_sampling in TASK_SAMPLING, "task_sampling", f"is {self.task_sampling!r}",
             f"use one of {TASK_SAMPLING}"),
            (self.teacher in TEACHERS, "teacher", f"is {self.teacher!r}", f"use one of {sorted(TEACHERS)}"),
            (self.temperature > 0, "temperature", "must be > 0", "use e.g. 0.8"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", "use e.g. 64"),
            (self.thinking in THINKING, "thinking", f"is {self.thinking!r}", f"use one of {THINKING}"),
            (0.0 <= self.replay_share < 1.0, "replay_share", f"is {self.replay_share}", "use a share in [0, 1)"),
            (self.train_epochs > 0, "train_epochs", "must be > 0", "use e.g. 2"),
            (self.max_length >= 16, "max_length", "must be >= 16", "use e.g. 256"),
            (self.eval_problems >= 1, "eval_problems", "must be >= 1", "use e.g. 16"),
            (self.sandbox_timeout_s > 0, "sandbox_timeout_s", "must be > 0", "use e.g. 5"),
            (self.sandbox_memory_mb > 0, "sandbox_memory_mb", "must be > 0", "use e.g. 256"),
            (self.sandbox_workers is None or self.sandbox_workers >= 1, "sandbox_workers", "must be >= 1",
             "leave it unset for the CPU count"),
            (isinstance(self.bake_prompts, dict) and all(isinstance(v, str) and v for v in self.bake_prompts.values()),
             "bake_prompts", "must map names to non-empty texts", "e.g. {identity: 'You are ...'}, or {}"),
            (len(self.self_model_bands) == 2 and 1 <= self.self_model_bands[0] <= self.self_model_bands[1],
             "self_model_bands", f"is {self.self_model_bands}", "use [first, last] band counts, e.g. [10, 19]"),
            (len(self.self_model_temperatures) == 2 and 0 < self.self_model_temperatures[0]
             < self.self_model_temperatures[1], "self_model_temperatures", f"is {self.self_model_temperatures}",
             "use [lowest, highest] with 0 < lowest < highest, e.g. [0.1, 2.0]"),
            (self.self_model_samples >= 0, "self_model_samples", "must be >= 0", "use e.g. 4, or 0 to skip"),
            (0.0 < self.self_model_mask_rate < 1.0, "self_model_mask_rate", f"is {self.self_model_mask_rate}",
             "use e.g. 0.2"),
            (self.self_model_epochs > 0, "self_model_epochs", "must be > 0", "use e.g. 1"),
            (self.dream_samples >= 1, "dream_samples", "must be >= 1", "use e.g. 16, or dreams: false"),
            (isinstance(self.dream_samples_per_task, int) and self.dream_samples_per_task >= 1,
             "dream_samples_per_task", f"is {self.dream_samples_per_task!r}", "use a count >= 1, e.g. 4"),
            (self.dream_temperature > 0, "dream_temperature", "must be > 0", "use e.g. 1.0"),
            (self.dream_filter in DREAM_FILTERS, "dream_filter", f"is {self.dream_filter!r}",
             f"use one of {DREAM_FILTERS} ('verified' trains only dreams that pass their tests in the sandbox)"),
            (self.dream_levels in DREAM_LEVELS, "dream_levels", f"is {self.dream_levels!r}",
             f"use one of {DREAM_LEVELS}"),
            (isinstance(self.dream_variants, int) and self.dream_variants >= 0, "dream_variants",
             f"is {self.dream_variants!r}", "use a count >= 0, e.g. 8, or 0 for none"),
            (isinstance(self.dream_lr_scale, int | float) and 0.0 < self.dream_lr_scale <= 1.0, "dream_lr_scale",
             f"is {self.dream_lr_scale!r}", "use a share of learning_rate in (0, 1], e.g. 0.3"),
            (0.0 < self.dream_real_share < 1.0, "dream_real_share", f"is {self.dream_real_share}",
             "use a share in (0, 1), e.g. 0.5: dreams without real data collapse"),
            (self.ste_mode or self.optimizer_type == "adamw", "ste_mode", "is off",
             "leave it on: the optimizer must update the shadow weights of the ternary layers"),
            (isinstance(bake_steps, int) and bake_steps >= 0, "bake", f"has steps={bake_steps!r}",
             "use a step count, or 0 to skip the bakes"),
        ]  # fmt: skip
        for ok, name, problem, fix in checks:
            if not ok:
                raise ValueError(f"{owner}.{name} {problem}. Fix: {fix}.")
        if bake_steps:
            try:
                PromptBakingConfig.from_dict(self.bake)
            except ValueError as error:
                raise ValueError(f"{owner}.bake is invalid: {error}") from None
        super().__post_init__()

    def bake_config(self, seed: int) -> PromptBakingConfig | None:
        """The bakes' `PromptBakingConfig` (None when baking is off)."""
        if not self.bake.get("steps", 1) or not self.bake_prompts:
            return None
        return PromptBakingConfig.from_dict({**self.bake, "seed": seed, "output": "merged"})

    def bands_for(self, level: int) -> int:
        """Self-modeling temperature bands at `level`: linear from the first count (level 1) to the last (level 10)."""
        first, last = self.self_model_bands
        return round(first + (last - first) * (level - 1) / 9)


__all__ = [
    "DEFAULT_BAKE",
    "DEFAULT_BAKE_PROMPTS",
    "DREAM_FILTERS",
    "DREAM_LEVELS",
    "POOL_SAMPLING",
    "SOLUTION_FORMATS",
    "TASK_SAMPLING",
    "THINKING",
    "CurriculumConfig",
]
