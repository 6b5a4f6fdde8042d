"""The contract of a merge method (mergekit's `MergeMethod`, reduced to what our recipes need): which parameters it
takes, globally and per model, whether it needs a `base_model` or layer `slices`, and `merge()`, which turns input
checkpoints into a new in-memory checkpoint."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .core import Checkpoint, ModelInput, SliceSource, param_numbers, resolve_param


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method: default, type, allowed range and whether it may vary per tensor."""

    default: Any
    help: str
    kind: Literal["float", "bool", "int", "choice"] = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    per_tensor: bool = True

    def _range(self) -> str:
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"{left}{low}, {high}{right}"

    def check_number(self, value: Any, where: str) -> None:
        """Raise a ValueError naming `where` when one scalar value is of the wrong type or out of range."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: must be true or false, got {value!r}")
            return
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{where}: must be one of {', '.join(self.choices)}, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: must be a finite number, got {value!r}")
        if self.kind == "int" and int(value) != value:
            raise ValueError(f"{where}: must be an integer, got {value!r}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise ValueError(f"{where}: must lie in {self._range()}, got {value!r}")

    def validate(self, value: Any, where: str) -> None:
        """Check a scalar, gradient or filter-list value; raise a ValueError naming `where`."""
        if isinstance(value, (list, tuple)):
            if not self.per_tensor:
                raise ValueError(f"{where}: takes one value for the whole merge, not a per-tensor list")
            if not value:
                raise ValueError(f"{where}: an empty list; give a value, a gradient [v0, v1, ...] or filter entries")
            for i, entry in enumerate(value):
                if isinstance(entry, Mapping):
                    unknown = sorted(set(entry) - {"filter", "value"})
                    if unknown or "value" not in entry:
                        raise ValueError(
                            f"{where}[{i}]: filter entries are {{filter: <substring>, value: <v>}}, got {dict(entry)}"
                        )
                    if "filter" in entry and not isinstance(entry["filter"], str):
                        raise ValueError(f"{where}[{i}].filter: must be a name substring, got {entry['filter']!r}")
                    self.validate(entry["value"], f"{where}[{i}].value")
                elif isinstance(entry, (list, tuple)):
                    raise ValueError(f"{where}[{i}]: nested lists are not a parameter form")
            kinds = {isinstance(entry, Mapping) for entry in value}
            if len(kinds) > 1:
                raise ValueError(f"{where}: mixes filter entries and plain numbers; use one form")
            if self.kind in ("bool", "choice") and not any(isinstance(entry, Mapping) for entry in value):
                raise ValueError(f"{where}: a {self.kind} cannot be a gradient; give one value or filter entries")
        for number in param_numbers(value):
            self.check_number(number, where)


BaseUse = Literal["required", "optional", "unused"]
Slices = Sequence[SliceSource] | None


class MergeMethod(ABC):
    """A merge method; instances are registered by name in `trainers.merging.registry.MERGE_METHODS`."""

    name: str = ""
    description: str = ""
    base_model: BaseUse = "unused"
    layer_stack: bool = False  # takes `slices` (a layer sequence) instead of tensor-by-tensor `models`
    parameters: Mapping[str, ParamSpec] = {}
    model_parameters: Mapping[str, ParamSpec] = {}

    def validate_stage(self, n_models: int, parameters: Mapping[str, Any], slices: Slices) -> None:
        """Method-specific structural checks of a recipe stage (raise ValueError naming the field); none by default."""
        return None

    def global_param(self, parameters: Mapping[str, Any], name: str) -> Any:
        """A global parameter's value, or its default."""
        return parameters.get(name, self.parameters[name].default)

    def model_param(self, model: ModelInput, name: str) -> Any:
        """A per-model parameter's value, or its default."""
        return model.parameters.get(name, self.model_parameters[name].default)

    def model_weights(self, models: Sequence[ModelInput], tensor_name: str, depth: int) -> torch.Tensor:
        """Each model's `weight` for one tensor, as a (N,) tensor."""
        return torch.tensor([float(resolve_param(self.model_param(m, "weight"), tensor_name, depth)) for m in models])

    @abstractmethod
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
        """Merge `models` (and `base`) into a new checkpoint called `name`; slices name models by checkpoint name."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def config_weight(value: Any) -> float:
    """One number standing for a (possibly per-tensor) model weight when merging config fields: the mean of its
    values."""
    numbers = [float(v) for v in param_numbers(value)]
    return sum(numbers) / len(numbers)


__all__ = ["BaseUse", "MergeMethod", "ParamSpec", "Slices", "config_weight"]
