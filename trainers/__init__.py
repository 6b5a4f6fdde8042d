"""Forge trainers: the shared `ForgeTrainer` base and the MuGrokfast optimizer."""

from .base import ForgeTrainer, ForgeTrainingArguments
from .mugrokfast import MuGrokfast, MuGrokfastCallback, MuGrokfastConfig, create_mugrokfast

__all__ = [
    "ForgeTrainer",
    "ForgeTrainingArguments",
    "MuGrokfast",
    "MuGrokfastCallback",
    "MuGrokfastConfig",
    "create_mugrokfast",
]
