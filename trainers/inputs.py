"""Checks of a phase's input checkpoint folder before it is loaded, so bad input fails with the file, the field and
the fix instead of a deep stack trace (a cut `model.safetensors`, a broken or foreign `config.json`, a tokenizer that
does not fit the embedding).

    check_checkpoint_folder("outputs/tiny/phase3", expect_forge=True)

Hub ids (not local folders) are left to `from_pretrained`. The safetensors header is read directly (8-byte length,
JSON, data) because the `safetensors` library reports a truncated data section only when the tensor is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

FIX_RERUN = "re-run the phase that wrote this folder (a finished phase's folder is complete), or point to another"
REQUIRED_FORGE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as it is; the message names the file, the field and the fix."""


def safetensors_problem(path: Path) -> str | None:
    """Why a `.safetensors` file is unusable (None if its header is valid and its data complete)."""
    size = path.stat().st_size
    if size < 8:
        return f"it has {size} bytes, less than the 8-byte header length"
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if 8 + header_len > size:
            return f"its header says {header_len} header bytes but the file has only {size} bytes (truncated)"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as error:
            return f"its JSON header is unreadable ({error})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"its tensors need {expected} bytes but the file has {size} (truncated)"
    return None


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    return {key: entry["shape"] for key, entry in header.items() if key != "__metadata__"}


def check_checkpoint_folder(folder: str | Path, *, expect_forge: bool = True, tokenizer=None) -> dict | None:
    """Validate a local checkpoint folder and return its `config.json` content (None for a Hub id, not checked here).

    Raises `CheckpointError` (a ValueError) or FileNotFoundError naming the file, the field and the fix for: a missing
    or unreadable `config.json`, a missing `model_type` or (with `expect_forge`) one other than "forge", missing or
    non-positive-integer size fields, a missing, cut or corrupt `*.safetensors`, an embedding whose shape disagrees
    with `vocab_size`/`hidden_size`, and a tokenizer with more tokens than the embedding has rows.
    """
    folder = Path(folder)
    if not folder.exists():
        if str(folder).startswith((".", "/", "~")) or str(folder).count("/") > 1:
            raise FileNotFoundError(f"{folder} does not exist. Fix: pass an existing checkpoint folder or a Hub id.")
        return None  # a Hub id: from_pretrained resolves and checks it
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} is missing, so {folder} is not a checkpoint. Fix: {FIX_RERUN}.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error}). Fix: {FIX_RERUN}.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} holds a {type(config).__name__}, not an object. Fix: {FIX_RERUN}.")
    model_type = config.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{config_path} has no field model_type. Fix: {FIX_RERUN} (a Forge folder has 'forge').")
    if expect_forge and model_type != "forge":
        raise CheckpointError(
            f"{config_path}: model_type is {model_type!r}, expected 'forge'. Fix: pass the output folder of a "
            "previous Agent Forge phase (e.g. outputs/<run>/phase1/reasoning)."
        )
    if model_type == "forge":
        for name in REQUIRED_FORGE_FIELDS:
            value = config.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CheckpointError(
                    f"{config_path}: field {name} is {value!r}, expected a positive integer. Fix: {FIX_RERUN}."
                )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights. Fix: {FIX_RERUN}.")
    for path in weights:
        problem = safetensors_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path} is unusable: {problem}. Fix: {FIX_RERUN}.")
    if model_type == "forge":
        shapes = {}
        for path in weights:
            shapes.update(_tensor_shapes(path))
        embedding = shapes.get("model.embed_tokens.weight")
        expected = [config["vocab_size"], config["hidden_size"]]
        if embedding is not None and len(embedding) == 2 and embedding != expected:
            raise CheckpointError(
                f"{config_path}: fields vocab_size={expected[0]}, hidden_size={expected[1]} disagree with "
                f"model.embed_tokens.weight of shape {embedding} in the weights. Fix: restore the config.json that "
                "was saved with these weights (or re-run the phase)."
            )
    if tokenizer is not None and len(tokenizer) > config.get("vocab_size", 0):
        raise CheckpointError(
            f"The tokenizer has {len(tokenizer)} tokens but {config_path} field vocab_size is "
            f"{config.get('vocab_size')}: ids past the embedding would crash. Fix: use the tokenizer saved in the "
            "same folder (tokenizer_name_or_path unset), or resize the model's embeddings "
            "(model.resize_token_embeddings(len(tokenizer))) before saving it."
        )
    return config


__all__ = ["CheckpointError", "check_checkpoint_folder", "safetensors_problem"]
