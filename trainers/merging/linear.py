"""Linear merge ("model soup", Wortsman et al. 2022): every tensor is the weighted mean of the inputs' tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from peft.utils.merge_utils import task_arithmetic
from transformers.utils import logging

from .base import MergeMethod, ParamSpec, config_weight
from .core import Checkpoint, ModelInput, SliceSource, check_compatible, merge_config_fields, resolve_param

logger = logging.get_logger(__name__)


def warn_if_unrelated(checkpoints: Sequence[Checkpoint], method: str) -> None:
    """Weight-space averaging of models with no shared ancestor rarely works; say so (not fatal without a base)."""
    if all(c.lineage_known for c in checkpoints):
        common = frozenset.intersection(*(c.lineage for c in checkpoints))
        if not common:
            logger.warning(
                "%s: %s share no ancestor in their lineage; averaging unrelated weights usually breaks the model.",
                method,
                [c.name for c in checkpoints],
            )


class LinearMerge(MergeMethod):
    """`sum_i w_i * theta_i` (divided by `sum_i w_i` when `normalize`), tensor by tensor."""

    name = "linear"
    description = "Weighted average of the models' weights (model soup)."
    base_model = "unused"
    parameters = {"normalize": ParamSpec(True, "Divide by the sum of the weights.", kind="bool")}
    model_parameters = {"weight": ParamSpec(1.0, "This model's weight (per tensor: gradient or filters).")}

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
        checkpoints = [m.checkpoint for m in models]
        check_compatible(checkpoints)
        warn_if_unrelated(checkpoints, self.name)
        depth = checkpoints[0].num_layers
        merged = {}
        for tensor_name in checkpoints[0].state_dict:
            weights = self.model_weights(models, tensor_name, depth)
            if resolve_param(self.global_param(parameters, "normalize"), tensor_name, depth):
                if float(weights.sum()) == 0:
                    raise ValueError(f"linear: the weights of {tensor_name} sum to zero; cannot normalise")
                weights = weights / weights.sum()
            # peft's task_arithmetic is exactly the weighted sum sum_i w_i * t_i.
            merged[tensor_name] = task_arithmetic([c.state_dict[tensor_name] for c in checkpoints], weights)
        config_weights = [config_weight(self.model_param(m, "weight")) for m in models]
        primary = checkpoints[max(range(len(models)), key=lambda i: config_weights[i])]
        config = merge_config_fields([c.config for c in checkpoints], config_weights, primary.config)
        return primary.derived(name, merged, config, checkpoints)


__all__ = ["LinearMerge"]
