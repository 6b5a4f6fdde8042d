"""What every phase writes at its end: the checkpoint, its lineage, metrics, plots and model card, atomically.

    path = save_phase_output("outputs/run/phase1/reasoning", model=model, tokenizer=tokenizer, phase=1,
                             phase_name="cognate", config=asdict(config), inputs=["outputs/run/phase1/init"],
                             metrics={"eval/perplexity": 41.2}, seed=0, wall_time_s=812.0)

The folder appears only when complete (`atomic_directory`), so a folder that exists is a finished phase.
"""

import datetime as dt
import hashlib
import importlib.metadata
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers.utils import logging

from hub_cards import write_card

from .checkpointing import atomic_directory

logger = logging.get_logger(__name__)

LINEAGE_FILE = "forge_lineage.json"
TRACKED_LIBRARIES = ("agent-forge", "torch", "transformers", "accelerate", "peft", "trl", "datasets", "safetensors")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on."""
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def weights_sha256(folder: Path) -> str | None:
    """One sha256 over a checkpoint folder's `*.safetensors` files (sorted by name), or None if it has none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _hub_id_of(source: str | Path, lineage: dict | None) -> str | None:
    """The Hub id an input is known by: a pushed folder's recorded repo, or the source itself if it is a Hub id."""
    if lineage is not None:
        return lineage.get("hub_repo_id")
    if Path(source).exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(source))
    except HFValidationError:
        return None
    return str(source)


def input_record(source: str | Path, kind: str = "model") -> tuple[dict, dict | None]:
    """Describe one input (local folder or Hub id) and return its own lineage, if it has one.

    `hub_id` is the input's Hub repo id where one is known (a Hub id input, or a local folder that was pushed), so the
    card's `base_model` never names a local path (the Hub rejects those).
    """
    path = Path(source)
    if path.is_dir():
        parent = json.loads((path / LINEAGE_FILE).read_text()) if (path / LINEAGE_FILE).exists() else None
        record = {"id": str(path), "kind": kind, "is_model": kind == "model", "sha256": weights_sha256(path),
                  "hub_id": _hub_id_of(path, parent or {})}  # fmt: skip
        return record, parent
    record = {"id": str(source), "kind": kind, "is_model": kind == "model", "sha256": None,
              "hub_id": _hub_id_of(source, None)}  # fmt: skip
    return record, None


def build_lineage(
    *,
    phase: int,
    phase_name: str,
    config: dict,
    inputs: Sequence[str | Path] = (),
    metrics: dict | None = None,
    seed: int | None = None,
    wall_time_s: float | None = None,
    datasets: Sequence[str] = (),
    tags: Sequence[str] = (),
    model_name: str | None = None,
    card_template: str = "phase",
) -> dict:
    """The `forge_lineage.json` record: this phase, its inputs (with content hashes) and their lineages in turn."""
    records, parents = [], []
    for source in inputs:
        record, parent = input_record(source)
        records.append(record)
        if parent is not None:
            parents.append(parent)
    return {
        "phase": phase,
        "phase_name": phase_name,
        "model_name": model_name or f"forge-phase{phase}-{phase_name}",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": records,
        "parents": parents,
        "config": config,
        "datasets": list(datasets),
        "tags": list(tags),
        "seed": seed,
        "wall_time_s": wall_time_s,
        "metrics": metrics or {},
        "library_versions": library_versions(),
        "card_template": card_template,
    }


def save_phase_output(
    output_dir: str | Path,
    *,
    model,
    tokenizer,
    phase: int,
    phase_name: str,
    config: dict,
    inputs: Sequence[str | Path] = (),
    metrics: dict[str, float] | None = None,
    eval_results: Sequence[dict] = (),
    seed: int | None = None,
    wall_time_s: float | None = None,
    datasets: Sequence[str] = (),
    tags: Sequence[str] = (),
    card_sections: dict | None = None,
    card_template: str = "phase",
    model_name: str | None = None,
    write_extras: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    hub_token: str | None = None,
    hub_private: bool | None = None,
) -> Path:
    """Write a finished phase result into `output_dir` in one atomic step and return its path.

    Writes `save_pretrained` output (config with `auto_map`, weights, generation config), the tokenizer,
    `forge_lineage.json`, `metrics.json` (`metrics` plus `eval_results` entries for the card's model-index:
    `{"dataset", "split", "metric", "value"}`), `card_sections.json`, whatever `write_extras(folder)` adds (plots
    under `plots/`, reports), and `README.md` rendered from those files. `push_to_hub` names a Hub repo to upload
    the finished folder to (created if missing; a name without a namespace goes under the token's user).
    """
    started = time.time()
    lineage = build_lineage(
        phase=phase,
        phase_name=phase_name,
        config=config,
        inputs=inputs,
        metrics=metrics,
        seed=seed,
        wall_time_s=wall_time_s,
        datasets=datasets,
        tags=tags,
        model_name=model_name or f"forge-phase{phase}-{phase_name}",
        card_template=card_template,
    )
    if push_to_hub:
        try:  # recorded so a later phase's card can name this folder by its Hub id (`base_model`)
            lineage["hub_repo_id"] = hub_repo_id(push_to_hub, hub_token)
        except Exception as error:  # the push below reports it, after the result is safely on disk
            logger.warning("Could not resolve the Hub repo id %r before saving: %s", push_to_hub, error)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str))
        payload = {"metrics": metrics or {}, "eval_results": list(eval_results)}
        (staging / "metrics.json").write_text(json.dumps(payload, indent=2, default=str))
        (staging / "card_sections.json").write_text(json.dumps(card_sections or {}, indent=2))
        if write_extras is not None:
            write_extras(staging)
        write_card(staging, card_template)
    final = Path(output_dir)
    logger.info("Phase %d (%s) written to %s in %.1f s", phase, phase_name, final, time.time() - started)
    if push_to_hub:
        push_folder(final, lineage.get("hub_repo_id") or push_to_hub, token=hub_token, private=hub_private,
                    commit_message=f"Agent Forge phase {phase} ({phase_name})")  # fmt: skip
    return final


def hub_repo_id(name: str, token: str | None = None) -> str:
    """`name` as a full Hub repo id: kept when it has a namespace (`user/name`), else under the token's user."""
    if "/" in name:
        return name
    from huggingface_hub import HfApi

    user = HfApi().whoami(token=token)["name"]
    return f"{user}/{name}"


def push_folder(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Agent Forge") -> str:  # fmt: skip
    """Create the Hub repo if needed (`create_repo(exist_ok=True)`) and upload a finished folder; returns the repo id.

    A repo id without a namespace goes under the token's user (`whoami`), as `Trainer.push_to_hub` does. Only the main
    process should call this.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)  # a fresh client reads the endpoint (HF_ENDPOINT) now, not at import
    full_id = hub_repo_id(repo_id, token)
    api.create_repo(full_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=full_id, folder_path=str(folder), commit_message=commit_message)
    logger.info("Pushed %s to the Hub as %s", folder, full_id)
    return full_id


__all__ = [
    "LINEAGE_FILE",
    "build_lineage",
    "hub_repo_id",
    "input_record",
    "library_versions",
    "push_folder",
    "save_phase_output",
    "weights_sha256",
]
