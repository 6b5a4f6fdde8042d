"""Forge trainers: the shared `ForgeTrainer` base, the MuGrokfast optimizer and prompt baking."""

from .baking_config import PromptBakingConfig
from .base import ForgeTrainer, ForgeTrainingArguments
from .mugrokfast import MuGrokfast, MuGrokfastCallback, MuGrokfastConfig, create_mugrokfast

# Prompt baking imports peft (~7 s); its functions load on first use so `import trainers` stays fast.
_LAZY = {"bake_prompt": "baking_trainer", "run_prompt_baking": "baking_trainer", "BakeResult": "baking_trainer"}
# Phase 2 (EvoMerge) and the merge methods, also loaded on first use.
_LAZY.update({"EvoMergeConfig": "evomerge_config", "run_phase2": "evomerge", "MergeRecipe": "merging",
              "get_merge_method": "merging", "run_recipe": "merging", "write_merge": "merging"})  # fmt: skip


def __getattr__(name: str):
    """Import the lazily exported names (PEP 562) on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BakeResult",
    "EvoMergeConfig",
    "ForgeTrainer",
    "ForgeTrainingArguments",
    "MuGrokfast",
    "MuGrokfastCallback",
    "MergeRecipe",
    "MuGrokfastConfig",
    "PromptBakingConfig",
    "bake_prompt",
    "create_mugrokfast",
    "get_merge_method",
    "run_phase2",
    "run_prompt_baking",
    "run_recipe",
    "write_merge",
]
