"""What the dashboard knows about each phase: its recipe, config class, folders in the run, and how it resumes.

One `PhaseSpec` per phase recipe that exists; everything phase-specific in the service is read from here, so a new
phase is one entry. Folder names follow the recipes' own layout (`<run>/phase1/<specialisation>`,
`<run>/phase2/champion`, `<run>/phase3`, `<run>/phase4`).
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def latest_checkpoint(folder: Path) -> str | None:
    """The highest-numbered `checkpoint-N` folder under `folder` (what Trainer resumes from), or None."""
    if not folder.is_dir():
        return None
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return str(max(steps)[1]) if steps else None


@dataclass(frozen=True)
class PhaseSpec:
    """One phase as the dashboard drives and shows it."""

    number: int
    name: str
    recipe: str  # path relative to the repository root
    config_class: str  # "module:Class"
    finished_marker: str  # a path under the run folder that exists once the phase is complete
    model_folders: Callable[[Path], list[Path]]  # the phase's finished model folders (cards, plots)
    paths: Callable[[Path], dict]  # config fields that place the phase's input and output in the run folder
    resume: Callable[[Path], dict] | None  # config fields that continue a paused run; None: cannot resume
    reports: tuple[str, ...] = ()  # report files under the run folder shown in the phase view
    charts: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (title, metric names) plotted live
    default_fields: dict = field(default_factory=dict)

    def load_config_class(self) -> type:
        module, name = self.config_class.split(":")
        return getattr(importlib.import_module(module), name)


def _subfolders_with_lineage(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / "forge_lineage.json").exists()) if folder.is_dir() else []


def _single(relative: str) -> Callable[[Path], list[Path]]:
    return lambda run: [run / relative] if (run / relative / "forge_lineage.json").exists() else []


TRACKING = {"report_to": ["trackio"], "project": "forge"}

PHASES: dict[int, PhaseSpec] = {
    1: PhaseSpec(
        number=1,
        name="Cognate",
        recipe="recipes/phase1.py",
        config_class="trainers.cognate_config:CognateConfig",
        finished_marker="phase1/diversity_report.json",
        model_folders=lambda run: _subfolders_with_lineage(run / "phase1"),
        paths=lambda run: {"output_dir": str(run)},
        resume=lambda run: {"resume": True},
        reports=("phase1/diversity_report.json",),
        charts=(
            ("training loss", ("train/loss",)),
            ("ACT mean halting step", ("train/act/avg_steps",)),
            ("MAG gate memory use", ("train/gate/m_usage",)),
        ),
    ),  # fmt: skip
    2: PhaseSpec(
        number=2,
        name="EvoMerge",
        recipe="recipes/phase2.py",
        config_class="trainers.evomerge_config:EvoMergeConfig",
        finished_marker="phase2/champion/forge_lineage.json",
        model_folders=_single("phase2/champion"),
        paths=lambda run: {"output_dir": str(run), "phase1_dir": str(run / "phase1")},
        resume=lambda run: {"resume": True},
        reports=("phase2/evolution.jsonl",),
        charts=(
            ("fitness per generation", ("evomerge/best", "evomerge/mean")),
            ("population diversity", ("evomerge/diversity",)),
        ),
    ),  # fmt: skip
    3: PhaseSpec(
        number=3,
        name="Quiet-STaR",
        recipe="recipes/phase3.py",
        config_class="trainers.quietstar_config:QuietStarConfig",
        finished_marker="phase3/forge_lineage.json",
        model_folders=_single("phase3"),
        paths=lambda run: {"output_dir": str(run), "model_name_or_path": str(run / "phase2" / "champion")},
        resume=None,
        reports=("phase3/anti_theater.json",),
        charts=(
            ("prompt bake KL", ("train/bake/kl",)),
            ("RL reward", ("train/quietstar/reward",)),
            ("KL to reference", ("train/quietstar/kl_ref",)),
        ),
    ),  # fmt: skip
    4: PhaseSpec(
        number=4,
        name="BitNet",
        recipe="recipes/phase4.py",
        config_class="trainers.bitnet_config:BitNetConfig",
        finished_marker="phase4/forge_lineage.json",
        model_folders=_single("phase4"),
        paths=lambda run: {"output_dir": str(run / "phase4"), "model_name_or_path": str(run / "phase3")},
        resume=lambda run: {"resume_from_checkpoint": latest_checkpoint(run / ".phase4-work")},
        reports=("phase4/bitnet_report.json",),
        charts=(("STE training loss", ("train/loss",)), ("distillation KL", ("train/loss/distill_kl",))),
    ),  # fmt: skip
}


def get_phase(number: int) -> PhaseSpec:
    """The spec of phase `number`; a KeyError names the phases that exist."""
    if number not in PHASES:
        raise KeyError(f"Phase {number} does not exist here. Phases: {sorted(PHASES)}.")
    return PHASES[number]


__all__ = ["PHASES", "TRACKING", "PhaseSpec", "get_phase", "latest_checkpoint"]
