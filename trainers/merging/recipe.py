"""mergekit-style merge recipes: parse and validate YAML, run it on in-memory checkpoints, write a Hub folder.

One merge:

    merge_method: ties                       # see trainers.merging.MERGE_METHODS
    base_model: outputs/tiny/phase1/init     # task-vector methods: the common ancestor
    models:
      - model: outputs/tiny/phase1/reasoning
        parameters: {weight: 1.0}
      - model: outputs/tiny/phase1/memory
        parameters: {weight: [0.5, 1.0]}     # a gradient over the layers
    parameters:
      density: [{filter: self_attn, value: 0.7}, {value: 0.5}]   # per tensor: first matching filter wins
      lambda: 1.0
    dtype: float32

Several merges in sequence (a later stage may use an earlier stage's `name` as a model):

    stages:
      - {name: soup, merge_method: linear, models: [A, B, C]}
      - {name: tv, merge_method: ties, base_model: INIT, models: [soup, A, B, C], parameters: {density: 0.5}}
      - merge_method: dfs
        base_model: tv
        slices:
          - sources: [{model: tv, layer_range: [0, 2]}]
          - sources: [{model: A, layer_range: [1, 2], scale: 0.8}]

Recipe-level fields besides the stages: `dtype`, `tokenizer_source`, `allow_unrelated_base` (merge task vectors even
when the base is not a common ancestor; warns) and `config_overrides` (non-shape ForgeConfig fields set on the result,
e.g. `{trm_max_steps: 2, act_threshold: 0.3}`; without it they follow `merge_config_fields`).

Every invalid field raises a `RecipeError` naming that field, the problem and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .base import MergeMethod
from .core import DTYPES, Checkpoint, ModelInput, SliceSource, load_checkpoint
from .registry import get_merge_method

STAGE_FIELDS = ("name", "merge_method", "base_model", "models", "parameters", "slices")
RECIPE_FIELDS = ("dtype", "tokenizer_source", "allow_unrelated_base", "config_overrides")
# ForgeConfig fields a recipe may set on the merged model: none of them changes a parameter shape. Each maps to a
# check of its type and range (ForgeConfig validates again when the model is built).
CONFIG_OVERRIDES = {
    "trm_max_steps": (int, 0, None, "an integer >= 0"),
    "trm_micro_steps": (int, 1, None, "an integer >= 1"),
    "act_threshold": (float, 0.0, 1.0, "a number strictly between 0 and 1"),
    "act_halting": (bool, None, None, "true or false"),
    "memory_decay": (float, 0.0, 1.0, "a number strictly between 0 and 1"),
    "memory_forget_scale": (float, 0.0, float("inf"), "a positive number"),
}


class RecipeError(ValueError):
    """An invalid merge recipe; the message starts with the offending field's path."""


def _fail(where: str, problem: str) -> None:
    raise RecipeError(f"recipe {where}: {problem}")


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            prefix = f"{where}." if where else ""
            _fail(f"{prefix}{key}", f"is not a recipe field{hint} (allowed: {', '.join(allowed)})")


@dataclass
class ModelEntry:
    """One model of a stage and its per-model parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeStage:
    """One merge: method, inputs and parameters."""

    merge_method: str
    models: list[ModelEntry] = field(default_factory=list)
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    slices: list[SliceSource] | None = None
    name: str | None = None

    @property
    def method(self) -> MergeMethod:
        """The registered merge method."""
        return get_merge_method(self.merge_method)

    def references(self) -> list[str]:
        """Every model this stage reads (base first), without repeats."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models] + [s.model for s in self.slices or []]
        return list(dict.fromkeys(refs))

    def to_dict(self) -> dict[str, Any]:
        """The YAML form of the stage."""
        data: dict[str, Any] = {}
        if self.name:
            data["name"] = self.name
        data["merge_method"] = self.merge_method
        if self.base_model:
            data["base_model"] = self.base_model
        if self.models:
            data["models"] = [
                {"model": m.model, "parameters": dict(m.parameters)} if m.parameters else {"model": m.model}
                for m in self.models
            ]
        if self.parameters:
            data["parameters"] = dict(self.parameters)
        if self.slices is not None:
            data["slices"] = []
            for s in self.slices:
                source = {"model": s.model, "layer_range": list(s.layer_range)}
                if s.scale != 1.0:
                    source["scale"] = s.scale
                data["slices"].append({"sources": [source]})
        return data


@dataclass
class MergeRecipe:
    """A validated recipe: one or more stages, then output settings."""

    stages: list[MergeStage]
    dtype: str = "float32"
    tokenizer_source: str | None = None
    allow_unrelated_base: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------------------------
    # Parsing.

    @classmethod
    def from_dict(cls, data: Any) -> MergeRecipe:
        """Validate a recipe mapping; raises `RecipeError` naming the first bad field."""
        if not isinstance(data, Mapping):
            _fail("(top level)", f"must be a mapping of recipe fields, got {type(data).__name__}")
        if "stages" in data:
            _check_keys(data, ("stages", *RECIPE_FIELDS), "")
            stage_list = data["stages"]
            if not isinstance(stage_list, list) or not stage_list:
                _fail("stages", "must be a non-empty list of merges")
            stage_items = [(item, f"stages[{i}]") for i, item in enumerate(stage_list)]
        else:
            _check_keys(data, (*STAGE_FIELDS, *RECIPE_FIELDS), "")
            stage_items = [({k: v for k, v in data.items() if k in STAGE_FIELDS}, "")]
        stages: list[MergeStage] = []
        names: set[str] = set()
        for item, where in stage_items:
            stage = _parse_stage(item, where, names)
            if stage.name:
                names.add(stage.name)
            stages.append(stage)
        dtype = data.get("dtype", "float32")
        if dtype not in DTYPES:
            _fail("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
        tokenizer_source = data.get("tokenizer_source")
        if tokenizer_source is not None and not isinstance(tokenizer_source, str):
            _fail("tokenizer_source", f"must be a model folder, got {tokenizer_source!r}")
        allow = data.get("allow_unrelated_base", False)
        if not isinstance(allow, bool):
            _fail("allow_unrelated_base", f"must be true or false, got {allow!r}")
        return cls(stages, dtype, tokenizer_source, allow, _parse_overrides(data.get("config_overrides")))

    @classmethod
    def from_yaml(cls, source: str | Path) -> MergeRecipe:
        """Parse a recipe from a YAML file path or a YAML string."""
        is_file = isinstance(source, Path) or ("\n" not in source and Path(source).is_file())
        text = Path(source).read_text() if is_file else str(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise RecipeError(f"recipe is not valid YAML: {error}") from error
        return cls.from_dict(data)

    # ----------------------------------------------------------------------------------------------------------
    # Writing.

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: a flat mapping for one unnamed stage, else `stages:`."""
        if len(self.stages) == 1 and not self.stages[0].name:
            data = self.stages[0].to_dict()
        else:
            data = {"stages": [stage.to_dict() for stage in self.stages]}
        data["dtype"] = self.dtype
        if self.tokenizer_source:
            data["tokenizer_source"] = self.tokenizer_source
        if self.allow_unrelated_base:
            data["allow_unrelated_base"] = True
        if self.config_overrides:
            data["config_overrides"] = dict(self.config_overrides)
        return data

    def to_yaml(self) -> str:
        """The recipe as YAML (what model cards embed and `recipes/merge.py --recipe` reads)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    def key(self) -> str:
        """A sha256 of the canonical recipe: equal recipes, equal keys (the fitness cache's key)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def sources(self) -> list[str]:
        """The checkpoints the recipe reads (references that are not stage names), in order of first use."""
        stage_names = {stage.name for stage in self.stages if stage.name}
        refs = [ref for stage in self.stages for ref in stage.references() if ref not in stage_names]
        return list(dict.fromkeys(refs))

    def tokenizer_folder(self) -> str:
        """Where the merged model's tokenizer comes from: `tokenizer_source`, else the first source folder holding
        one (all sources share one vocabulary, which the merge checks)."""
        if self.tokenizer_source:
            return self.tokenizer_source
        for ref in self.sources():
            if (Path(ref) / "tokenizer_config.json").exists() or (Path(ref) / "tokenizer.json").exists():
                return ref
        raise FileNotFoundError(f"No source of the recipe holds a tokenizer ({self.sources()}); set tokenizer_source.")


def _parse_overrides(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail("config_overrides", f"must be a mapping of ForgeConfig fields to values, got {value!r}")
    for key, item in value.items():
        if key not in CONFIG_OVERRIDES:
            _fail(f"config_overrides.{key}", f"cannot be set by a merge (allowed: {', '.join(CONFIG_OVERRIDES)}; "
                                             "fields that change parameter shapes never can)")  # fmt: skip
        kind, low, high, expected = CONFIG_OVERRIDES[key]
        if kind is bool:
            valid = isinstance(item, bool)
        elif kind is int:
            valid = isinstance(item, int) and not isinstance(item, bool) and item >= low
        else:
            valid = isinstance(item, (int, float)) and not isinstance(item, bool) and low < item < high
        if not valid:
            _fail(f"config_overrides.{key}", f"must be {expected}, got {item!r}")
    return {key: float(v) if CONFIG_OVERRIDES[key][0] is float else v for key, v in value.items()}


def _parse_parameters(value: Any, specs: Mapping[str, Any], where: str, method: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(where, f"must be a mapping of parameter names to values, got {value!r}")
    for key, item in value.items():
        if key not in specs:
            known = ", ".join(sorted(specs)) or "none"
            _fail(f"{where}.{key}", f"is not a parameter of {method} (its parameters here: {known})")
        try:
            specs[key].validate(item, f"{where}.{key}")
        except ValueError as error:
            raise RecipeError(f"recipe {error}") from None
    return dict(value)


def _parse_slices(value: Any, where: str) -> list[SliceSource]:
    if not isinstance(value, list) or not value:
        _fail(where, "must be a non-empty list of {sources: [{model, layer_range: [start, end], scale}]}")
    slices = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            _fail(at, f"must be a mapping with `sources`, got {item!r}")
        _check_keys(item, ("sources",), at)
        sources = item.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            _fail(
                f"{at}.sources",
                "must list exactly one source; merging several models inside a slice is not supported here "
                "(merge them in an earlier stage and stack that stage's output)",
            )
        source = sources[0]
        at = f"{at}.sources[0]"
        if not isinstance(source, Mapping):
            _fail(at, f"must be a mapping {{model, layer_range, scale}}, got {source!r}")
        _check_keys(source, ("model", "layer_range", "scale"), at)
        if not isinstance(source.get("model"), str) or not source["model"]:
            _fail(f"{at}.model", f"must name a model folder or an earlier stage, got {source.get('model')!r}")
        span = source.get("layer_range")
        if (
            not isinstance(span, list)
            or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            or not 0 <= span[0] < span[1]
        ):
            _fail(f"{at}.layer_range", f"must be [start, end] with 0 <= start < end (end exclusive), got {span!r}")
        scale = source.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            _fail(f"{at}.scale", f"must be a positive number, got {scale!r}")
        slices.append(SliceSource(source["model"], (span[0], span[1]), float(scale)))
    return slices


def _parse_stage(data: Any, where: str, earlier: set[str]) -> MergeStage:
    prefix = f"{where}." if where else ""
    if not isinstance(data, Mapping):
        _fail(where, f"a merge must be a mapping of fields, got {data!r}")
    _check_keys(data, STAGE_FIELDS, where)
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        _fail(f"{prefix}name", f"must be a non-empty string, got {name!r}")
    if name in earlier:
        _fail(f"{prefix}name", f"{name!r} is used by an earlier stage; stage names must be unique")
    method_name = data.get("merge_method")
    if method_name is None:
        _fail(f"{prefix}merge_method", "is missing; name a merge method (e.g. linear, slerp, ties, dare_ties, dfs)")
    try:
        method = get_merge_method(method_name)
    except ValueError as error:
        raise RecipeError(f"recipe {prefix}merge_method: {error}") from None

    def check_ref(ref: Any, at: str) -> str:
        if not isinstance(ref, str) or not ref:
            _fail(at, f"must name a model folder or an earlier stage, got {ref!r}")
        if ref == name:
            _fail(at, f"a stage cannot read its own output ({ref!r})")
        return ref

    base = data.get("base_model")
    if base is not None:
        check_ref(base, f"{prefix}base_model")
    if method.base_model == "required" and base is None:
        _fail(f"{prefix}base_model", f"{method.name} merges task vectors (model - base), so it needs a base_model: "
                                     "the models' common ancestor (Phase 1's init)")  # fmt: skip
    if method.base_model == "unused" and base is not None:
        _fail(f"{prefix}base_model", f"{method.name} does not use a base_model; list every input under models")

    models: list[ModelEntry] = []
    raw_models = data.get("models")
    if method.layer_stack:
        if raw_models is not None:
            _fail(f"{prefix}models", f"{method.name} takes its layers from slices; remove models")
        if "slices" not in data:
            _fail(f"{prefix}slices", f"{method.name} needs slices giving the layer sequence")
        slices = _parse_slices(data["slices"], f"{prefix}slices")
        for i, source in enumerate(slices):
            check_ref(source.model, f"{prefix}slices[{i}].sources[0].model")
    else:
        if "slices" in data:
            _fail(
                f"{prefix}slices",
                f"{method.name} merges tensor by tensor; slices are for franken, dfs and passthrough",
            )
        slices = None
        if not isinstance(raw_models, list) or not raw_models:
            _fail(f"{prefix}models", f"{method.name} needs a non-empty list of models")
        for i, entry in enumerate(raw_models):
            at = f"{prefix}models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, Mapping):
                _fail(at, f"must be a model folder or {{model, parameters}}, got {entry!r}")
            _check_keys(entry, ("model", "parameters"), at)
            ref = check_ref(entry.get("model"), f"{at}.model")
            specs = method.model_parameters
            params = _parse_parameters(entry.get("parameters"), specs, f"{at}.parameters", method.name)
            models.append(ModelEntry(ref, params))
    parameters = _parse_parameters(data.get("parameters"), method.parameters, f"{prefix}parameters", method.name)
    n_models = len([m for m in models if m.model != base])
    if method.name == "slerp" and base is not None:
        n_models += 1
    try:
        method.validate_stage(n_models, parameters, slices)
    except ValueError as error:
        raise RecipeError(f"recipe {prefix}{error}") from None
    return MergeStage(method.name, models, base, parameters, slices, name)


# ---------------------------------------------------------------------------------------------------------------
# Running.


def run_recipe(
    recipe: MergeRecipe,
    checkpoints: Mapping[str, Checkpoint] | None = None,
    *,
    loader: Callable[[str], Checkpoint] = load_checkpoint,
) -> Checkpoint:
    """Run every stage and return the last stage's checkpoint (in float32; `dtype` applies when building the model),
    with the recipe's `config_overrides` applied to its config.

    `checkpoints` supplies already-loaded models by reference (the evolution keeps its parents in memory); other
    references are loaded from disk with `loader`.
    """
    available: dict[str, Checkpoint] = {}
    provided = dict(checkpoints or {})

    def get(ref: str) -> Checkpoint:
        if ref not in available:
            checkpoint = provided[ref] if ref in provided else loader(ref)
            available[ref] = checkpoint if checkpoint.name == ref else replace(checkpoint, name=ref)
        return available[ref]

    result = None
    for index, stage in enumerate(recipe.stages):
        method = stage.method
        base = get(stage.base_model) if stage.base_model else None
        if method.layer_stack:
            models = [ModelInput(get(ref)) for ref in dict.fromkeys(s.model for s in stage.slices)]
        else:
            models = [ModelInput(get(entry.model), entry.parameters) for entry in stage.models]
        result = method.merge(
            models,
            base=base,
            parameters=stage.parameters,
            slices=stage.slices,
            name=stage.name or f"stage{index}",
            allow_unrelated_base=recipe.allow_unrelated_base,
        )
        if stage.name:
            available[stage.name] = result
    if recipe.config_overrides:
        config = {**result.config, **recipe.config_overrides}
        if config.get("trm_max_steps") != result.config.get("trm_max_steps"):
            config["trm_step_weights"] = None  # re-derived for the new depth
        result = replace(result, config=config)
    return result


__all__ = ["MergeRecipe", "MergeStage", "ModelEntry", "RecipeError", "run_recipe"]
