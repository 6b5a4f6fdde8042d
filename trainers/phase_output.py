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


def input_record(source: str | Path, kind: str = "model") -> tuple[dict, dict | None]:
    """Describe one input (local folder or Hub id) and return its own lineage, if it has one."""
    path = Path(source)
    if path.is_dir():
        parent = json.loads((path / LINEAGE_FILE).read_text()) if (path / LINEAGE_FILE).exists() else None
        record = {"id": str(path), "kind": kind, "is_model": kind == "model", "sha256": weights_sha256(path)}
        return record, parent
    return {"id": str(source), "kind": kind, "is_model": kind == "model", "sha256": None}, None


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
) -> Path:
    """Write a finished phase result into `output_dir` in one atomic step and return its path.

    Writes `save_pretrained` output (config with `auto_map`, weights, generation config), the tokenizer,
    `forge_lineage.json`, `metrics.json` (`metrics` plus `eval_results` entries for the card's model-index:
    `{"dataset", "split", "metric", "value"}`), `card_sections.json`, whatever `write_extras(folder)` adds (plots
    under `plots/`, reports), and `README.md` rendered from those files. `push_to_hub` names a Hub repo to upload
    the finished folder to.
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
        from huggingface_hub import upload_folder

        upload_folder(repo_id=push_to_hub, folder_path=str(final), commit_message=f"Agent Forge phase {phase}")
    return final


__all__ = ["LINEAGE_FILE", "build_lineage", "input_record", "library_versions", "save_phase_output", "weights_sha256"]
