"""Task arithmetic, generalised (mergekit's `GeneralizedTaskArithmeticMerge`): merge the task vectors
`tau_i = theta_i - theta_base` and add the result back, `theta = theta_base + lambda * merge(tau)`.

The variants are one class with two options, each combination computed by the matching function of
`peft.utils.merge_utils`:

| name | sparsify (trim) | sign election | peft function | paper |
|---|---|---|---|---|
| `task_arithmetic` | none | no | `task_arithmetic` | Ilharco et al. 2023 |
| `magnitude_prune` | keep the top-`density` magnitudes | no | `magnitude_prune` | |
| `ties` | keep the top-`density` magnitudes | yes | `ties` | Yadav et al. 2023 (TIES-Merging) |
| `dare_linear` | drop at random, rescale by 1/density | no | `dare_linear` | Yu et al. 2024 (DARE) |
| `dare_ties` | drop at random, rescale by 1/density | yes | `dare_ties` | DARE + TIES sign election |

Sign election (TIES): per entry, the sign of the summed task vectors wins, and the entries that agree with it are
averaged (weighted), so conflicting updates do not cancel each other out. DARE's random drop is seeded per tensor
(recipe `seed` plus the tensor name), so a recipe always produces the same model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from peft.utils import merge_utils

from .base import MergeMethod, ParamSpec, Slices, config_weight
from .core import (
    Checkpoint,
    ModelInput,
    SliceSource,
    check_common_ancestor,
    check_compatible,
    merge_config_fields,
    resolve_param,
)

Sparsify = Literal["magnitude", "random"] | None
_PEFT_FUNCTIONS = {
    (None, False): "task_arithmetic",
    ("magnitude", False): "magnitude_prune",
    ("magnitude", True): "ties",
    ("random", False): "dare_linear",
    ("random", True): "dare_ties",
}


def _tensor_seed(seed: int, tensor_name: str) -> int:
    from evaluation.tasks.base import stable_hash

    return stable_hash("dare", seed, tensor_name) % (2**63)


class TaskArithmeticMerge(MergeMethod):
    """`base + lambda * merge({w_i * trim(tau_i)})`, trimming and sign election chosen at construction."""

    base_model = "required"

    def __init__(self, name: str, *, sparsify: Sparsify, sign_consensus: bool, description: str) -> None:
        if (sparsify, sign_consensus) not in _PEFT_FUNCTIONS:
            raise ValueError(f"No task-arithmetic variant with sparsify={sparsify!r} and sign_consensus=False")
        self.name = name
        self.sparsify = sparsify
        self.sign_consensus = sign_consensus
        self.description = description
        self._function = getattr(merge_utils, _PEFT_FUNCTIONS[(sparsify, sign_consensus)])
        parameters = {
            "lambda": ParamSpec(1.0, "Scale of the merged task vector added to the base."),
        }
        if sparsify is not None:
            parameters["density"] = ParamSpec(
                0.5, "Fraction of each task vector's entries kept.", low=0.0, high=1.0, low_open=True
            )
        if sparsify == "random":
            parameters["seed"] = ParamSpec(
                0, "Seed of the random drop (mixed with each tensor's name).", kind="int", per_tensor=False
            )
        if sign_consensus:
            parameters["majority_sign_method"] = ParamSpec(
                "total", "Elect the sign by summed values (total) or by counting signs (frequency).", kind="choice",
                choices=("total", "frequency"), per_tensor=False,
            )  # fmt: skip
        self.parameters = parameters
        self.model_parameters = {"weight": ParamSpec(1.0, "Weight of this model's task vector.")}

    def validate_stage(self, n_models: int, parameters: Mapping[str, Any], slices: Slices) -> None:
        if n_models < 1:
            raise ValueError(f"models: {self.name} needs at least one model besides base_model")

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
        if base is None:
            raise ValueError(f"base_model: {self.name} needs a base_model, the common ancestor of the models")
        models = [m for m in models if m.checkpoint is not base]  # mergekit lets the base appear among the models
        self.validate_stage(len(models), parameters, slices)
        checkpoints = [m.checkpoint for m in models]
        check_compatible([base, *checkpoints])
        check_common_ancestor(checkpoints, base, allow_unrelated=allow_unrelated_base)
        depth = base.num_layers
        seed = int(self.global_param(parameters, "seed")) if self.sparsify == "random" else 0
        merged = {}
        for tensor_name, base_tensor in base.state_dict.items():
            weights = self.model_weights(models, tensor_name, depth)
            task_vectors = [c.state_dict[tensor_name] - base_tensor for c in checkpoints]
            kwargs: dict[str, Any] = {}
            if self.sparsify is not None:
                kwargs["density"] = float(resolve_param(self.global_param(parameters, "density"), tensor_name, depth))
            if self.sign_consensus:
                kwargs["majority_sign_method"] = self.global_param(parameters, "majority_sign_method")
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
                torch.manual_seed(_tensor_seed(seed, tensor_name))
                delta = self._function(task_vectors, weights, **kwargs)
            scale = float(resolve_param(self.global_param(parameters, "lambda"), tensor_name, depth))
            merged[tensor_name] = base_tensor + scale * delta
        config_weights = [config_weight(self.model_param(m, "weight")) for m in models]
        config = merge_config_fields([c.config for c in checkpoints], config_weights, base.config)
        return base.derived(name, merged, config, [base, *checkpoints])


TASK_ARITHMETIC_VARIANTS = (
    TaskArithmeticMerge("task_arithmetic", sparsify=None, sign_consensus=False,
                        description="Weighted sum of task vectors added to the base."),
    TaskArithmeticMerge("magnitude_prune", sparsify="magnitude", sign_consensus=False,
                        description="Task arithmetic on the top-density magnitudes of each task vector."),
    TaskArithmeticMerge("ties", sparsify="magnitude", sign_consensus=True,
                        description="TIES: keep the top-density magnitudes, elect signs, average agreeing entries."),
    TaskArithmeticMerge("dare_linear", sparsify="random", sign_consensus=False,
                        description="DARE: drop entries at random, rescale by 1/density, sum."),
    TaskArithmeticMerge("dare_ties", sparsify="random", sign_consensus=True,
                        description="DARE drop-and-rescale, then TIES sign election."),
)  # fmt: skip

__all__ = ["TASK_ARITHMETIC_VARIANTS", "TaskArithmeticMerge"]
