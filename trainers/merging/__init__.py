"""Model merging on in-memory state dicts, mergekit style: one small module per method, a registry, YAML recipes.

    from trainers.merging import MergeRecipe, get_merge_method, run_recipe, write_merge

    recipe = MergeRecipe.from_yaml("recipes/configs/merge_ties_tiny.yaml")  # or a dict / YAML string
    checkpoint = run_recipe(recipe)                  # Checkpoint: state dict + config + ancestry
    write_merge(recipe, "outputs/tiny/merge/ties")   # Hub folder, card embeds the recipe

Methods (`MERGE_METHODS`): `linear`, `slerp`, the task-arithmetic family relative to a `base_model`
(`task_arithmetic`, `magnitude_prune`, `ties`, `dare_linear`, `dare_ties`; one class with options, computed by
`peft.utils.merge_utils`), and layer stacking (`franken`: per-layer choice of the source; `dfs` / `passthrough`:
any layer path with per-layer input scales).

Rules every method follows: the tied LM head is never merged on its own (it follows the merged embedding); all
other tensors, non-layer ones included (embedding, final norm, memory, MAG gate, TRM refiner, ACT head), are merged
by the method's math (layer stacks take the non-layer tensors from `base_model`, else the first slice's model);
non-shape config fields follow `merge_config_fields`; incompatible inputs and task vectors from a base that is not
a common ancestor are refused with a message that names the mismatch.
"""

from .base import MergeMethod, ParamSpec
from .config import MergeConfig
from .core import (
    Checkpoint,
    ModelInput,
    SliceSource,
    build_model,
    check_common_ancestor,
    check_compatible,
    checkpoint_from_model,
    load_checkpoint,
    merge_config_fields,
    resolve_param,
)
from .dfs import DFSMerge
from .franken import FrankenMerge, stack_layers
from .linear import LinearMerge
from .output import corpus_perplexity, merged_model, write_merge
from .recipe import MergeRecipe, MergeStage, ModelEntry, RecipeError, run_recipe
from .registry import MERGE_METHODS, get_merge_method
from .slerp import SlerpMerge, slerp
from .task_arithmetic import TaskArithmeticMerge

__all__ = [
    "MERGE_METHODS",
    "Checkpoint",
    "DFSMerge",
    "FrankenMerge",
    "LinearMerge",
    "MergeConfig",
    "MergeMethod",
    "MergeRecipe",
    "MergeStage",
    "ModelEntry",
    "ModelInput",
    "ParamSpec",
    "RecipeError",
    "SliceSource",
    "SlerpMerge",
    "TaskArithmeticMerge",
    "build_model",
    "check_common_ancestor",
    "check_compatible",
    "checkpoint_from_model",
    "corpus_perplexity",
    "get_merge_method",
    "load_checkpoint",
    "merge_config_fields",
    "merged_model",
    "resolve_param",
    "run_recipe",
    "slerp",
    "stack_layers",
    "write_merge",
]
