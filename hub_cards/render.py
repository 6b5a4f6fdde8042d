"""Render a phase output folder's model card from the files the run wrote there.

A card never receives numbers as arguments: everything it shows comes from `forge_lineage.json` (phase, inputs,
config, versions, seed, wall time), `metrics.json` (measured results and the model-index entries),
`card_sections.json` (the phase's prose) and `plots/*.png` in the folder itself.
"""

import json
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def available_templates() -> list[str]:
    """Names of the card templates (one per phase, plus the shared base)."""
    return sorted(path.name.removesuffix(".md.j2") for path in TEMPLATES_DIR.glob("*.md.j2") if path.stem != "base")


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def _eval_results(entries: list[dict]) -> list[EvalResult]:
    results = []
    for entry in entries:
        results.append(
            EvalResult(
                task_type=entry.get("task_type", "text-generation"),
                dataset_type=entry["dataset"],
                dataset_name=entry.get("dataset_name", entry["dataset"]),
                dataset_split=entry.get("split"),
                metric_type=entry["metric"],
                metric_name=entry.get("metric_name", entry["metric"]),
                metric_value=entry["value"],
            )
        )
    return results


def _hub_id(record: dict) -> str | None:
    """An input's Hub id, also for lineages written before `hub_id` was recorded (a local path is never one)."""
    if "hub_id" in record:
        return record["hub_id"]
    if record.get("sha256") is not None or Path(record["id"]).exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(record["id"])
    except HFValidationError:
        return None
    return record["id"]


def render_card(folder: str | Path, template: str | None = None) -> ModelCard:
    """Build the `ModelCard` of a phase output folder (does not write it)."""
    folder = Path(folder)
    lineage = _read_json(folder / "forge_lineage.json", None)
    if lineage is None:
        raise FileNotFoundError(f"{folder} has no forge_lineage.json; write the lineage before rendering the card.")
    metrics = _read_json(folder / "metrics.json", {"metrics": lineage.get("metrics", {}), "eval_results": []})
    sections = _read_json(folder / "card_sections.json", {})
    template = template or lineage.get("card_template", "phase")
    template_path = TEMPLATES_DIR / f"{template}.md.j2"
    if not template_path.exists():
        raise ValueError(f"Unknown card template {template!r}. Fix: use one of {available_templates()}.")
    # The Hub accepts only Hub ids as `base_model`: local inputs without a known Hub id are left out (the lineage and
    # the card body still name them).
    base_models = [_hub_id(item) for item in lineage.get("inputs", []) if item.get("is_model", True)]
    base_models = [item for item in base_models if item]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["agent-forge", "forge", f"phase-{lineage['phase']}", lineage["phase_name"], *lineage.get("tags", [])],
        base_model=base_models or None,
        datasets=lineage.get("datasets") or None,
        eval_results=_eval_results(metrics.get("eval_results", [])) or None,
        model_name=lineage.get("model_name", folder.name),
    )
    plots = sorted(str(path.relative_to(folder)) for path in (folder / "plots").glob("*.png"))
    memory_type = _read_json(folder / "config.json", {}).get("memory_type")
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    text = environment.get_template(template_path.name).render(
        card_data=card_data.to_yaml(),
        lineage=lineage,
        metrics=metrics.get("metrics", {}),
        eval_entries=metrics.get("eval_results", []),
        sections=sections,
        plots=plots,
        memory_type=memory_type,
        config_json=json.dumps(lineage.get("config", {}), indent=2, sort_keys=True, default=str),
    )
    return ModelCard(text)


def write_card(folder: str | Path, template: str | None = None) -> Path:
    """Render and write `README.md` into the folder."""
    path = Path(folder) / "README.md"
    render_card(folder, template).save(path)
    return path
