"""Settings of `recipes/merge.py`: a recipe file (`--recipe`) or the recipe's fields inline in the YAML config, and
where to write the merged folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .recipe import MergeRecipe

INLINE_FIELDS = (
    "merge_method", "base_model", "models", "parameters", "slices", "stages", "tokenizer_source", "config_overrides",
)  # fmt: skip


def _json_field(value: Any, name: str) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"MergeConfig.{name} is not valid JSON ({error}). Fix: give YAML in the config."
            ) from error
    return value


@dataclass
class MergeConfig:
    """One merge: `--recipe x.yaml --out DIR`, or a config YAML holding the recipe fields and `output_dir`."""

    recipe: str | None = field(default=None, metadata={"help": "Path of a mergekit-style recipe YAML."})
    out: str | None = field(default=None, metadata={"help": "Folder to write the merged model to."})
    output_dir: str | None = field(default=None, metadata={"help": "Same as --out (the name configs use)."})
    merge_method: str | None = field(default=None, metadata={"help": "Inline recipe: the merge method."})
    base_model: str | None = field(default=None, metadata={"help": "Inline recipe: the base model folder."})
    models: list | str | None = field(default=None, metadata={"help": "Inline recipe: [{model, parameters}]."})
    parameters: dict | str | None = field(default=None, metadata={"help": "Inline recipe: global parameters."})
    slices: list | str | None = field(default=None, metadata={"help": "Inline recipe: layer slices."})
    stages: list | str | None = field(default=None, metadata={"help": "Inline recipe: several merges in sequence."})
    tokenizer_source: str | None = field(default=None, metadata={"help": "Folder whose tokenizer the output gets."})
    config_overrides: dict | str | None = field(
        default=None, metadata={"help": "Inline recipe: non-shape ForgeConfig fields set on the merged model."}
    )
    dtype: str = field(default="float32", metadata={"help": "Output dtype: float32, float16 or bfloat16."})
    allow_unrelated_base: bool = field(
        default=False, metadata={"help": "Merge task vectors even when the base is not the models' common ancestor."}
    )
    eval_tokens: int = field(
        default=0, metadata={"help": "Validation-corpus tokens to measure the merged model's perplexity (0: skip)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to upload the merged folder to."})

    def __post_init__(self) -> None:
        self.out = self.out or self.output_dir
        if not self.out:
            raise ValueError("MergeConfig.out is not set. Fix: pass --out DIR (or output_dir in the config).")
        for name in ("models", "parameters", "slices", "stages", "config_overrides"):
            setattr(self, name, _json_field(getattr(self, name), name))
        inline = [name for name in INLINE_FIELDS if getattr(self, name) is not None]
        if self.recipe and inline:
            raise ValueError(
                f"MergeConfig: --recipe was given together with inline recipe fields {inline}. Fix: use one of them."
            )
        if not self.recipe and not inline:
            raise ValueError("MergeConfig: no recipe. Fix: pass --recipe x.yaml or put the recipe fields in --config.")
        if self.eval_tokens < 0:
            raise ValueError(f"MergeConfig.eval_tokens must be >= 0, got {self.eval_tokens}.")
        self.merge_recipe()  # validate now, before any model is loaded

    def merge_recipe(self) -> MergeRecipe:
        """The validated recipe."""
        if self.recipe:
            recipe = MergeRecipe.from_yaml(self.recipe)
            if self.dtype != "float32" or self.allow_unrelated_base:  # command-line overrides
                data = recipe.to_dict()
                data.update(
                    dtype=self.dtype, allow_unrelated_base=self.allow_unrelated_base or recipe.allow_unrelated_base
                )
                recipe = MergeRecipe.from_dict(data)
            return recipe
        data = {name: getattr(self, name) for name in INLINE_FIELDS if getattr(self, name) is not None}
        data.update(dtype=self.dtype, allow_unrelated_base=self.allow_unrelated_base)
        return MergeRecipe.from_dict(data)


__all__ = ["MergeConfig"]
