"""What every merge method shares: checkpoints as in-memory state dicts, compatibility and ancestry checks, per-tensor
parameter values (mergekit's scalars, layer gradients and name filters) and the rule for non-shape config fields.

A `Checkpoint` holds a model's state dict *without* tied copies (the LM head is tied to the input embedding, so only
`model.embed_tokens.weight` is merged and the head follows it when the model is rebuilt), its config as a plain dict,
and its ancestry: the weight hashes of itself and of every checkpoint it descends from (read from
`forge_lineage.json`), which is how task-vector merges check that their base really is a common ancestor.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Input-side tensors take the first value of a layer gradient, every other non-layer tensor the last (see
# `resolve_param`).
INPUT_SIDE_PREFIXES = ("model.embed_tokens.",)
# Config keys that are bookkeeping or derived, never compared or merged.
IGNORED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "auto_map", "architectures", "layer_types", "dtype")
# Runtime switches that may differ without mattering (taken from the primary model, silently).
RUNTIME_CONFIG_KEYS = ("use_cache", "output_hidden_states", "output_attentions", "return_dict")
# Config fields that keep every parameter shape but differ between Phase 1's specialisations; weight-space merges
# combine them with the merge's model weights (see `merge_config_fields`).
WEIGHTED_CONFIG_FIELDS = (
    "trm_max_steps",
    "act_threshold",
    "memory_decay",
    "memory_forget_scale",
    "layer_input_scales",
)
INTEGER_CONFIG_FIELDS = ("trm_max_steps",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Checkpoint:
    """A model as merge input or output: tensors, config and ancestry, all in memory."""

    name: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    ancestry: frozenset[str] = frozenset()
    sha256: str | None = None
    lineage_known: bool = False
    path: Path | None = None
    vocab_fingerprint: str | None = None
    tied_keys: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        """Decoder layers (`num_hidden_layers`)."""
        return int(self.config["num_hidden_layers"])

    @property
    def lineage(self) -> frozenset[str]:
        """Its own weight hash (when known) and its ancestors'."""
        return self.ancestry | ({self.sha256} if self.sha256 else frozenset())

    def derived(self, name: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any], inputs) -> Checkpoint:
        """A merge result of `inputs`: it descends from all of them (their lineages become its ancestry)."""
        ancestry = frozenset().union(*(c.lineage for c in inputs))
        return Checkpoint(
            name=name,
            state_dict=state_dict,
            config=config,
            ancestry=ancestry,
            lineage_known=all(c.lineage_known for c in inputs),
            vocab_fingerprint=self.vocab_fingerprint,
            tied_keys=self.tied_keys,
        )


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name (`model.layers.3.mlp...` -> 3), or None for non-layer tensors."""
    match = LAYER_PATTERN.match(name)
    return int(match.group(1)) if match else None


def rename_layer(name: str, new_index: int) -> str:
    """`model.layers.{i}.rest` -> `model.layers.{new_index}.rest`."""
    match = LAYER_PATTERN.match(name)
    if match is None:
        raise ValueError(f"{name} is not a decoder-layer tensor")
    return f"model.layers.{new_index}.{match.group(2)}"


# ---------------------------------------------------------------------------------------------------------------
# Loading and lineage.


def _collect_hashes(lineage: Mapping[str, Any], into: set[str]) -> None:
    for record in lineage.get("inputs", []):
        if record.get("sha256"):
            into.add(record["sha256"])
    for parent in lineage.get("parents", []):
        _collect_hashes(parent, into)


def read_ancestry(folder: str | Path) -> tuple[frozenset[str], bool]:
    """Weight hashes of every ancestor recorded in a folder's `forge_lineage.json`, and whether it has one."""
    path = Path(folder) / "forge_lineage.json"
    if not path.exists():
        return frozenset(), False
    hashes: set[str] = set()
    _collect_hashes(json.loads(path.read_text()), hashes)
    return frozenset(hashes), True


def vocab_fingerprint(folder: str | Path) -> str | None:
    """A hash of the tokenizer vocabulary in `tokenizer.json` (None without one): equal vocabularies, equal hashes."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    vocab = json.loads(path.read_text()).get("model", {}).get("vocab")
    added = json.loads(path.read_text()).get("added_tokens", [])
    payload = json.dumps([vocab, [(t.get("id"), t.get("content")) for t in added]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict without bookkeeping and derived keys."""
    return {k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS}


def checkpoint_from_model(model, name: str, **fields: Any) -> Checkpoint:
    """Wrap a loaded model: a detached copy of its tensors without tied duplicates, and its config."""
    config = model.config.to_dict()
    tied = tuple(getattr(model, "_tied_weights_keys", None) or {}) if config.get("tie_word_embeddings") else ()
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items() if k not in tied}
    return Checkpoint(name=name, state_dict=state, config=clean_config(config), tied_keys=tied, **fields)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint folder (a Forge model, or any transformers causal LM, for compatibility errors)."""
    from transformers import AutoModelForCausalLM

    import modeling_forge  # noqa: F401  (registers the forge model type with the Auto classes)
    from trainers.phase_output import weights_sha256

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json). Fix: pass a saved model.")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    kwargs = {} if model_type == "forge" else {"trust_remote_code": False}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    ancestry, known = read_ancestry(folder)
    return checkpoint_from_model(
        model,
        str(path),
        ancestry=ancestry,
        sha256=weights_sha256(folder),
        lineage_known=known,
        path=folder,
        vocab_fingerprint=vocab_fingerprint(folder),
    )


def build_model(checkpoint: Checkpoint, dtype: str = "float32"):
    """A `ForgeForCausalLM` holding the checkpoint's tensors (tied head re-tied), in eval mode."""
    from modeling_forge import ForgeConfig, ForgeForCausalLM

    config = ForgeConfig.from_dict(dict(checkpoint.config))
    model = ForgeForCausalLM(config)
    missing, unexpected = model.load_state_dict(checkpoint.state_dict, strict=False)
    missing = [k for k in missing if k not in checkpoint.tied_keys]
    if missing or unexpected:
        raise ValueError(f"{checkpoint.name}: tensors do not fit the config (missing {missing}, extra {unexpected})")
    return model.to(DTYPES[dtype]).eval()


# ---------------------------------------------------------------------------------------------------------------
# Compatibility.


def check_compatible(checkpoints: Sequence[Checkpoint], *, same_depth: bool = True) -> None:
    """Raise a ValueError naming the first mismatch (model type, tied head, vocabulary, tensor names or shapes).

    `same_depth=False` (layer stacking) lets the layer counts differ but still requires every layer to have the
    same tensors and shapes.
    """
    first = checkpoints[0]
    for other in checkpoints[1:]:
        pair = f"{first.name!r} and {other.name!r}"
        for key in ("model_type", "tie_word_embeddings", "vocab_size"):
            if first.config.get(key) != other.config.get(key):
                raise ValueError(
                    f"Cannot merge {pair}: {key} differs ({first.config.get(key)!r} vs {other.config.get(key)!r}). "
                    "Fix: merge checkpoints of one architecture and vocabulary (e.g. Phase 1's three outputs)."
                )
        if first.vocab_fingerprint and other.vocab_fingerprint and first.vocab_fingerprint != other.vocab_fingerprint:
            raise ValueError(
                f"Cannot merge {pair}: their tokenizers have different vocabularies (same size, different tokens), "
                "so embedding rows mean different things. Fix: merge models trained with one tokenizer."
            )
        if same_depth and first.num_layers != other.num_layers:
            raise ValueError(
                f"Cannot merge {pair} tensor by tensor: num_hidden_layers differs ({first.num_layers} vs "
                f"{other.num_layers}). Fix: use a layer-stacking method (franken, dfs, passthrough) instead."
            )
        if same_depth and first.config.get("memory_layers") != other.config.get("memory_layers"):
            raise ValueError(
                f"Cannot merge {pair} tensor by tensor: memory_layers differs ({first.config.get('memory_layers')} vs "
                f"{other.config.get('memory_layers')}), so their layers hold different tensors. Fix: merge models "
                "built with the same memory_layers, or use a layer-stacking method (franken, dfs)."
            )
        a, b = _shape_template(first), _shape_template(other)
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                raise ValueError(
                    f"Cannot merge {pair}: tensor {name} has shape {a.get(name)} vs {b.get(name)} (None = missing). "
                    "Fix: merge checkpoints with the same architecture settings (hidden, memory and TRM sizes)."
                )


def _shape_template(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Tensor shapes keyed by name, layer tensors folded onto one `model.layers.*` template."""
    return {LAYER_PATTERN.sub(r"model.layers.*.\2", name): tuple(t.shape) for name, t in checkpoint.state_dict.items()}


def check_common_ancestor(models: Sequence[Checkpoint], base: Checkpoint, *, allow_unrelated: bool = False) -> None:
    """Task vectors `model - base` only make sense when `base` is an ancestor of every model (SPEC's known trap).

    Raises a ValueError when the lineages prove otherwise (a warning with `allow_unrelated`); warns when a model
    has no lineage to check.
    """
    if not base.lineage:
        logger.warning("Base %s has no recorded weight hash; its ancestry cannot be checked.", base.name)
        return
    for model in models:
        if not model.lineage_known:
            logger.warning("%s has no forge_lineage.json; cannot check that %s is an ancestor", model.name, base.name)
            continue
        if base.lineage & model.lineage:
            continue
        message = (
            f"{model.name!r} does not descend from base_model {base.name!r}: no checkpoint in its lineage "
            "(forge_lineage.json) matches the base's weights, so the two have no common ancestor and the task "
            "vector model - base is meaningless. Fix: use the shared Phase 1 init as base_model (the parents' "
            "lineage names it), or set allow_unrelated_base: true to merge anyway."
        )
        if not allow_unrelated:
            raise ValueError(message)
        logger.warning(message)


# ---------------------------------------------------------------------------------------------------------------
# Parameter values: a number, a gradient over layers, or a list of {filter, value} entries (mergekit's forms).


def resolve_param(value: Any, tensor_name: str, num_layers: int) -> Any:
    """The value of a parameter for one tensor.

    - a scalar (number or bool) applies everywhere;
    - a list of numbers is a gradient over the layers: anchors spread evenly from layer 0 to the last layer and
      linearly interpolated (input-side tensors, the embedding, take the first value; other non-layer tensors, the
      final norm, TRM refiner and ACT head, the last);
    - a list of `{filter: substring, value: v}` entries: the first whose filter occurs in the tensor name wins, an
      entry without `filter` is the default; `v` may itself be a scalar or a gradient.
    """
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, Mapping) for v in value):
        for entry in value:
            if "filter" not in entry or entry["filter"] in tensor_name:
                return resolve_param(entry["value"], tensor_name, num_layers)
        raise ValueError(f"No entry of {value} matches tensor {tensor_name} and none is a default (no `filter`).")
    if isinstance(value, Sequence) and value and all(isinstance(v, (int, float)) for v in value):
        anchors = [float(v) for v in value]
        index = layer_index(tensor_name)
        if index is None:
            return anchors[0] if tensor_name.startswith(INPUT_SIDE_PREFIXES) else anchors[-1]
        if len(anchors) == 1 or num_layers == 1:
            return anchors[0]
        position = index / (num_layers - 1) * (len(anchors) - 1)
        low = min(int(math.floor(position)), len(anchors) - 2)
        return anchors[low] + (position - low) * (anchors[low + 1] - anchors[low])
    raise ValueError(f"Parameter value {value!r} is not a number, a gradient or a list of filter entries.")


def param_numbers(value: Any) -> list[Any]:
    """Every scalar inside a parameter value (for range validation)."""
    if isinstance(value, Mapping):
        return param_numbers(value.get("value"))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [n for item in value for n in param_numbers(item)]
    return [value]


# ---------------------------------------------------------------------------------------------------------------
# Non-shape config fields.


def merge_config_fields(
    configs: Sequence[Mapping[str, Any]], weights: Sequence[float], primary: Mapping[str, Any]
) -> dict[str, Any]:
    """The merged model's config: `primary`'s, except the non-shape fields of `WEIGHTED_CONFIG_FIELDS` that differ.

    Rule: those fields take the weighted mean of the inputs' values with the merge's normalised model weights
    (`trm_max_steps` rounded to the nearest integer, its step weights then re-derived; `layer_input_scales`
    elementwise, None counting as all ones). Any other differing field comes from `primary` (the base model, or
    the most-weighted model) with a warning. A convex combination keeps every field inside its valid range.
    """
    merged = dict(primary)
    total = sum(weights)
    norm = [w / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)
    for key in WEIGHTED_CONFIG_FIELDS:
        values = [c.get(key) for c in configs]
        if all(v == values[0] for v in values):
            merged[key] = values[0]
            continue
        if key == "layer_input_scales":
            depth = int(primary["num_hidden_layers"])
            rows = [v if v is not None else [1.0] * depth for v in values]
            merged[key] = [float(sum(w * row[i] for w, row in zip(norm, rows, strict=True))) for i in range(depth)]
            continue
        mean = sum(w * float(v) for w, v in zip(norm, values, strict=True))
        merged[key] = int(math.floor(mean + 0.5)) if key in INTEGER_CONFIG_FIELDS else round(mean, 6)
    if merged.get("trm_max_steps") != primary.get("trm_max_steps"):
        merged["trm_step_weights"] = None  # re-derived by ForgeConfig for the new depth
    others = sorted(
        key
        for key in set().union(*configs)
        if key not in WEIGHTED_CONFIG_FIELDS
        and key not in ("trm_step_weights", *RUNTIME_CONFIG_KEYS, *IGNORED_CONFIG_KEYS)
        and any(c.get(key) != primary.get(key) for c in configs)
    )
    if others:
        logger.warning("Config fields %s differ between the merged models; taking the primary model's", others)
    return merged


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum (refusing a zero sum)."""
    total = float(sum(weights))
    if total == 0:
        raise ValueError(f"Model weights {list(weights)} sum to zero. Fix: give a nonzero weight.")
    return [float(w) / total for w in weights]


@dataclass
class ModelInput:
    """One merge input: the checkpoint and its per-model parameters (e.g. `weight`)."""

    checkpoint: Checkpoint
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """A run of layers `[start, end)` of one model, each layer's input scaled by `scale` (layer stacking)."""

    model: str
    layer_range: tuple[int, int]
    scale: float = 1.0


def with_config(checkpoint: Checkpoint, **changes: Any) -> Checkpoint:
    """A copy with config fields changed (the tensors are shared, not copied)."""
    return replace(checkpoint, config={**checkpoint.config, **changes})


__all__ = [
    "DTYPES",
    "Checkpoint",
    "ModelInput",
    "SliceSource",
    "build_model",
    "check_common_ancestor",
    "check_compatible",
    "checkpoint_from_model",
    "clean_config",
    "layer_index",
    "load_checkpoint",
    "merge_config_fields",
    "normalized_weights",
    "param_numbers",
    "read_ancestry",
    "rename_layer",
    "resolve_param",
    "vocab_fingerprint",
    "with_config",
]
