"""Data-flow-space (DFS) merge: which layer of which model runs at each depth, in which order, with what input
scaling (Akiba et al., "Evolutionary Optimization of Model Merging Recipes", 2024).

The paper searches a path through the layers of all models (an include/exclude indicator over a repeated layer
sequence) and a scaling of the hidden state handed between layers. Here a path is an explicit list of
(model, layer, scale) steps, written as mergekit `slices`; it may repeat, reorder, drop or mix layers:

    merge_method: dfs
    base_model: outputs/run/phase1/speed          # embedding, final norm, TRM refiner and ACT head
    slices:
      - sources: [{model: outputs/run/phase1/speed, layer_range: [0, 1]}]
      - sources: [{model: outputs/run/phase1/reasoning, layer_range: [0, 2], scale: 0.9}]

The result is materialised as an ordinary checkpoint with `num_hidden_layers = len(path)`, the chosen layers'
weights copied, and `ForgeConfig.layer_input_scales` holding the scales: each layer starts with an RMS norm, so a
scale of the incoming residual stream cannot be folded into weights and the model applies it in `forward`.
`passthrough` (mergekit's name for layer stacking) is the same method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import MergeMethod, Slices
from .core import Checkpoint, ModelInput, SliceSource
from .franken import expand_slices, stack_layers


class DFSMerge(MergeMethod):
    """A layer path: any sequence of (model, layer) steps, each with an input scale."""

    base_model = "optional"
    layer_stack = True

    def __init__(self, name: str = "dfs", description: str = "Data-flow search: an evolved layer path.") -> None:
        self.name = name
        self.description = description

    def validate_stage(self, n_models: int, parameters: Mapping[str, Any], slices: Slices) -> None:
        if not slices:
            raise ValueError(f"slices: {self.name} needs slices giving the layer path")

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
        inputs = [body, *by_name.values()]
        return stack_layers(path, body, name, list({id(c): c for c in inputs}.values()))


__all__ = ["DFSMerge"]
