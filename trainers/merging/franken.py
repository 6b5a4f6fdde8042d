"""FrankenMerge: a model whose layer `i` is layer `i` of a chosen source model (layer-wise selection).

Recipes state the choice as mergekit `slices`, one source per slice, covering layers 0..L-1 in order:

    merge_method: franken
    base_model: outputs/run/phase1/speed          # embedding, final norm, TRM refiner and ACT head come from it
    slices:
      - sources: [{model: outputs/run/phase1/reasoning, layer_range: [0, 1]}]
      - sources: [{model: outputs/run/phase1/memory, layer_range: [1, 2]}]

`stack_layers` (shared with DFS) copies the chosen layers into a new state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import MergeMethod, Slices
from .core import Checkpoint, ModelInput, SliceSource, check_compatible, layer_index, rename_layer


def expand_slices(slices: Sequence[SliceSource]) -> list[tuple[str, int, float]]:
    """The layer path of a slice list: one (model name, source layer, input scale) per new layer."""
    return [(s.model, layer, s.scale) for s in slices for layer in range(s.layer_range[0], s.layer_range[1])]


def stack_layers(
    path: Sequence[tuple[Checkpoint, int, float]], body: Checkpoint, name: str, inputs: Sequence[Checkpoint]
) -> Checkpoint:
    """A model with `len(path)` layers, layer k a copy of layer `path[k][1]` of `path[k][0]`, its input scaled by
    `path[k][2]` (times the scale that layer already had); every non-layer tensor (embedding and tied head, final
    norm, TRM refiner, ACT head) and every config field but the depth and the scales come from `body`."""
    check_compatible([body, *{id(c): c for c, _, _ in path}.values()], same_depth=False)
    state: dict[str, torch.Tensor] = {k: v for k, v in body.state_dict.items() if layer_index(k) is None}
    scales = []
    for new_index, (source, layer, scale) in enumerate(path):
        if not 0 <= layer < source.num_layers:
            raise ValueError(f"slices: layer {layer} does not exist in {source.name} ({source.num_layers} layers)")
        prefix = f"model.layers.{layer}."
        for tensor_name, tensor in source.state_dict.items():
            if tensor_name.startswith(prefix):
                state[rename_layer(tensor_name, new_index)] = tensor
        previous = source.config.get("layer_input_scales") or [1.0] * source.num_layers
        scales.append(float(scale) * float(previous[layer]))
    # A source layer keeps its memory branch (or its lack of one): the new stack's memory layers follow the path.
    memory = [k for k, (source, layer, _) in enumerate(path) if _layer_has_memory(source.config, layer)]
    config = {
        **body.config,
        "num_hidden_layers": len(path),
        "layer_input_scales": None if all(s == 1.0 for s in scales) else scales,
        "memory_layers": None if len(memory) == len(path) else memory,
    }
    if not memory:
        config["memory_type"], config["memory_layers"] = "none", None
    return body.derived(name, state, config, inputs)


def _layer_has_memory(config: Mapping[str, Any], layer: int) -> bool:
    """Whether `layer` of a checkpoint with this config dict has the memory branch (`ForgeConfig.memory_layers`)."""
    if config.get("memory_type", "ema") == "none":
        return False
    return config.get("memory_layers") is None or layer in config["memory_layers"]


class FrankenMerge(MergeMethod):
    """Layer `i` from the source named by slice `i`; no reordering, repetition or scaling (see `DFSMerge`)."""

    name = "franken"
    description = "Per-layer choice of the source model (layer-wise selection)."
    base_model = "optional"
    layer_stack = True

    def validate_stage(self, n_models: int, parameters: Mapping[str, Any], slices: Slices) -> None:
        if not slices:
            raise ValueError("slices: franken needs slices that choose a source model for every layer")
        depth = 0
        for i, source in enumerate(slices):
            start, end = source.layer_range
            if start != depth:
                raise ValueError(
                    f"slices[{i}].sources[0].layer_range: franken keeps layer positions, so this slice must start at "
                    f"layer {depth}, got {start}. Fix: use dfs (or passthrough) to reorder or repeat layers"
                )
            if source.scale != 1.0:
                raise ValueError(f"slices[{i}].sources[0].scale: franken does not scale layers; use dfs for that")
            depth = end

    def merge(
        self,
        models: Sequence[ModelInput],
        *,
        base: Checkpoint | None,
        parameters: Mapping[str, Any],
        slices: Sequence[SliceSource] | None,
        name: str,
        allow_unrelated_base: bool = False,
    ) -> Checkpoint:
        self.validate_stage(len(models), parameters, slices)
        by_name = {m.checkpoint.name: m.checkpoint for m in models}
        body = base or by_name[slices[0].model]
        path = [(by_name[model], layer, scale) for model, layer, scale in expand_slices(slices)]
        if len(path) != body.num_layers:
            raise ValueError(
                f"slices: franken must choose a source for each of the {body.num_layers} layers, got {len(path)}"
            )
        inputs = [body, *by_name.values()]
        return stack_layers(path, body, name, list({id(c): c for c in inputs}.values()))


__all__ = ["FrankenMerge", "expand_slices", "stack_layers"]
