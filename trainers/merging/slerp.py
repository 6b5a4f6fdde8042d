"""SLERP: spherical linear interpolation of two models' tensors (Shoemake 1985; mergekit's `slerp`), extended to
several models as a chain of pairwise interpolations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import MergeMethod, ParamSpec, Slices, config_weight
from .core import Checkpoint, ModelInput, SliceSource, check_compatible, merge_config_fields, resolve_param
from .linear import warn_if_unrelated

DOT_THRESHOLD = 0.9995


def slerp(t: float, start: torch.Tensor, end: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Interpolate along the great circle between the directions of `start` (t=0) and `end` (t=1).

    Written by hand (torch and peft have no slerp); same formula as mergekit: the angle comes from the normalised
    flattened tensors, the sine weights are applied to the unnormalised ones, and nearly parallel tensors fall back
    to linear interpolation. Two tensors of equal norm give results of that same norm for every t.
    """
    a, b = start.double().flatten(), end.double().flatten()
    a_unit, b_unit = a / a.norm().clamp_min(eps), b / b.norm().clamp_min(eps)
    dot = float((a_unit * b_unit).sum().clamp(-1.0, 1.0))
    if abs(dot) > DOT_THRESHOLD:
        result = (1.0 - t) * a + t * b
    else:
        theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
        sin_theta = torch.sin(theta)
        result = torch.sin((1.0 - t) * theta) / sin_theta * a + torch.sin(t * theta) / sin_theta * b
    return result.reshape(start.shape).to(start.dtype)


class SlerpMerge(MergeMethod):
    """Two models: `slerp(t, first, second)` per tensor (first = `base_model` when given). More models: a chain,
    `acc <- slerp(w_i / (w_1 + ... + w_i), acc, model_i)`, so each model's share follows its `weight`."""

    name = "slerp"
    description = "Spherical interpolation of two models (a weighted chain of pairwise ones for more)."
    base_model = "optional"
    parameters = {"t": ParamSpec(None, "For two models: 0 = the first, 1 = the second.", low=0.0, high=1.0)}
    model_parameters = {"weight": ParamSpec(1.0, "Share of this model in a chain of several.", low=0.0)}

    def validate_stage(self, n_models: int, parameters: Mapping[str, Any], slices: Slices) -> None:
        if n_models < 2:
            raise ValueError(f"models: slerp interpolates at least two models, got {n_models}")
        if parameters.get("t") is not None and n_models != 2:
            raise ValueError(f"parameters.t: t interpolates exactly two models; with {n_models} give each a weight")

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
        if base is not None:  # mergekit: the base is the t=0 end
            models = [ModelInput(base)] + [m for m in models if m.checkpoint is not base]
        self.validate_stage(len(models), parameters, slices)
        checkpoints = [m.checkpoint for m in models]
        check_compatible(checkpoints)
        warn_if_unrelated(checkpoints, self.name)
        depth = checkpoints[0].num_layers
        t_value = parameters.get("t")
        merged = {}
        for tensor_name in checkpoints[0].state_dict:
            if t_value is not None:
                shares = [1.0 - resolve_param(t_value, tensor_name, depth), resolve_param(t_value, tensor_name, depth)]
            else:
                shares = [float(resolve_param(self.model_param(m, "weight"), tensor_name, depth)) for m in models]
            result, seen = checkpoints[0].state_dict[tensor_name], shares[0]
            for checkpoint, share in zip(checkpoints[1:], shares[1:], strict=True):
                seen += share
                t = share / seen if seen > 0 else 0.0
                result = slerp(t, result, checkpoint.state_dict[tensor_name])
            merged[tensor_name] = result
        if t_value is not None:
            config_weights = [1.0 - config_weight(t_value), config_weight(t_value)]
        else:
            config_weights = [config_weight(self.model_param(m, "weight")) for m in models]
        primary = base or checkpoints[max(range(len(models)), key=lambda i: config_weights[i])]
        config = merge_config_fields([c.config for c in checkpoints], config_weights, primary.config)
        return primary.derived(name, merged, config, checkpoints)


__all__ = ["SlerpMerge", "slerp"]
