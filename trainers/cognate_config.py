"""Configuration of Phase 1 (Cognate): three specialised models from one initialisation, on a staged curriculum."""

import os
from dataclasses import dataclass, field

from .base import ForgeTrainingArguments
from .config_fields import check_own_field_types, json_field
from .data import CurriculumStage, default_curriculum, validate_curriculum

# What makes each specialisation different. Only fields that keep every parameter's shape may differ, so the
# three models share one initialisation and Phase 2 can merge them tensor by tensor (task vectors from the init).
DEFAULT_SPECIALIZATIONS: dict[str, dict] = {
    "reasoning": {
        "seed": 1,
        # Threshold 0.9: in this setting (4 steps, this mix; `benchmarks/recursion.py`, tiny, 6 seeds) ACT ran 59.5% of
        # the steps at +0.28 / +0.27% arithmetic / code loss vs every step; 0.7 ran 40% at +1.08% on arithmetic. On a
        # second machine: 59.4% of the steps, within 0.9% on every source in every seed (README, "Measured").
        "model": {"trm_max_steps": 4, "act_threshold": 0.9},
        "mixture_scale": {"arithmetic": 2.0, "code": 1.5},
    },
    "memory": {
        "seed": 2,
        "model": {"memory_decay_scale": 0.5, "act_threshold": 0.5},
        "mixture_scale": {"kv_recall": 3.0, "corpus": 1.5},
    },
    "speed": {
        "seed": 3,
        "model": {"trm_max_steps": 2, "act_threshold": 0.3},
        "mixture_scale": {"corpus": 2.0},
    },
}
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "memory_type",
    "memory_size",
    "gate_hidden_size",
    "trm_intermediate_size",
)


@dataclass
class CognateConfig(ForgeTrainingArguments):
    """Phase 1 settings. `output_dir` is the run folder: results go to `<output_dir>/phase1/<specialisation>/`."""

    model_preset: str = field(default="tiny", metadata={"help": "ForgeConfig preset: 'tiny' or 'cognate-25m'."})
    model_overrides: dict | str | None = field(
        default=None, metadata={"help": "ForgeConfig fields applied on top of the preset, for all three models."}
    )
    model_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Embedding rows; default: the tokenizer's size rounded up to a multiple of 64."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "A Hub id or folder of a tokenizer; default: build a BPE on the corpus."}
    )
    tokenizer_vocab_size: int = field(default=1024, metadata={"help": "Size of the built BPE vocabulary."})
    tokenizer_chars: int = field(default=2_000_000, metadata={"help": "Characters of text to fit the BPE on."})
    specializations: dict | str | None = field(
        default=None,
        metadata={
            "help": "name -> {seed, model: {ForgeConfig overrides; 'memory_decay_scale' scales (1 - decay)}, "
            "mixture_scale: {source: multiplier}}. Default: reasoning, memory, speed (see DEFAULT_SPECIALIZATIONS)."
        },
    )
    curriculum: list | str | None = field(
        default=None,
        metadata={
            "help": "Stages [{name, end, seq_len, mixture, difficulty, prompt_loss}]; default: 3 stages 64/128/256."
        },
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of the shared initialisation all three start from."})
    eval_tokens: int = field(default=20_000, metadata={"help": "Validation tokens per perplexity evaluation."})
    eval_task_examples: int = field(
        default=32, metadata={"help": "Validation examples per task family for the diversity report."}
    )
    param_budget: list | str | None = field(
        default=None, metadata={"help": "[min, max] parameters; training refuses a model outside it."}
    )
    loss_spike_factor: float = field(
        default=3.0, metadata={"help": "A loss above this multiple of its running mean counts as a spike."}
    )
    rollback_lr_factor: float = field(default=0.5, metadata={"help": "Learning-rate multiplier after a rollback."})
    snapshot_interval: int = field(default=20, metadata={"help": "Steps between in-memory last-good snapshots."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run in the same output_dir."})

    def __post_init__(self) -> None:
        check_own_field_types(self, "CognateConfig")
        self.model_overrides = json_field(self.model_overrides, "CognateConfig", "model_overrides") or {}
        self.specializations = json_field(self.specializations, "CognateConfig", "specializations") or {
            name: dict(values) for name, values in DEFAULT_SPECIALIZATIONS.items()
        }
        curriculum = json_field(self.curriculum, "CognateConfig", "curriculum")
        self.param_budget = json_field(self.param_budget, "CognateConfig", "param_budget")
        if not isinstance(self.specializations, dict) or not self.specializations:
            raise ValueError("CognateConfig.specializations must map names to settings. Fix: see the YAML presets.")
        for name, spec in self.specializations.items():
            kinds = {"seed": int, "model": dict, "mixture_scale": dict}
            if not isinstance(spec, dict) or any(
                key in spec and (not isinstance(spec[key], kind) or isinstance(spec[key], bool))
                for key, kind in kinds.items()
            ):
                raise ValueError(
                    f"CognateConfig.specializations[{name!r}] is {spec!r}. Fix: give a mapping with seed (int), model "
                    "(a mapping of ForgeConfig fields) and mixture_scale (a mapping of source -> multiplier)."
                )
            unknown = set(spec) - {"seed", "model", "mixture_scale"}
            if unknown:
                raise ValueError(f"CognateConfig.specializations[{name!r}] has unknown keys {sorted(unknown)}. "
                                 "Fix: use seed, model, mixture_scale.")  # fmt: skip
            changed = set(spec.get("model", {})) & set(SHAPE_FIELDS)
            if changed:
                raise ValueError(
                    f"CognateConfig.specializations[{name!r}] changes {sorted(changed)}, which change parameter "
                    "shapes; the three models must share one initialisation. Fix: set them in model_overrides."
                )
        if curriculum and (not isinstance(curriculum, list) or not all(isinstance(s, dict) for s in curriculum)):
            raise ValueError(
                f"CognateConfig.curriculum is {curriculum!r}; it must be a list of stages. Fix: write stages as "
                "[{name, end, seq_len, mixture, difficulty}, ...] (see recipes/configs/phase1_tiny.yaml)."
            )
        try:
            self._stages = (
                [CurriculumStage.from_dict(stage) for stage in curriculum] if curriculum else default_curriculum()
            )
            validate_curriculum(self._stages)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"CognateConfig.curriculum: {error}") from None
        self.curriculum = [
            {
                "name": s.name,
                "end": s.end,
                "seq_len": s.seq_len,
                "mixture": s.mixture,
                "difficulty": list(s.difficulty),
            }
            for s in self._stages
        ]
        if self.param_budget is not None and (
            len(self.param_budget) != 2 or self.param_budget[0] > self.param_budget[1]
        ):
            raise ValueError(f"CognateConfig.param_budget={self.param_budget} must be [min, max].")
        if self.max_steps is None or self.max_steps <= 0:
            raise ValueError("CognateConfig.max_steps must be set (> 0): the curriculum is laid out in steps.")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ValueError("CognateConfig.rollback_lr_factor must lie in (0, 1].")
        if self.report_to in (None, "all") or "wandb" in (self.report_to or []):
            os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user chose a mode
        super().__post_init__()

    @property
    def stages(self) -> list[CurriculumStage]:
        return self._stages


__all__ = ["CognateConfig", "DEFAULT_SPECIALIZATIONS", "SHAPE_FIELDS"]
