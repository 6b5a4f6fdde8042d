"""What the dashboard knows about each phase: its recipe, config class, folders in the run, and how it resumes.

One `PhaseSpec` per phase recipe that exists; everything phase-specific in the service is read from here, so a new
phase is one entry. Folder names follow the recipes' own layout (`<run>/phase1/<specialisation>`,
`<run>/phase2/champion`, `<run>/phase3`, `<run>/phase4`).
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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
    tracking: bool = True  # the config has `report_to`/`project` (trackio logging)

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
    ),
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
    ),
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
    ),
    4: PhaseSpec(
        number=4,
        name="BitNet",
        recipe="recipes/phase4.py",
        config_class="trainers.bitnet_config:BitNetConfig",
        finished_marker="phase4/forge_lineage.json",
        model_folders=_single("phase4"),
        paths=lambda run: {"output_dir": str(run / "phase4"), "model_name_or_path": str(run / "phase3")},
        resume=lambda run: {"resume": True},
        reports=("phase4/bitnet_report.json",),
        charts=(("STE training loss", ("train/loss",)), ("distillation KL", ("train/loss/distill_kl",))),
    ),
    # Phases 5 and 6 resume at level / cycle boundaries (their own `resume`), not from a mid-step checkpoint, so
    # they are stopped and started again rather than paused.
    5: PhaseSpec(
        number=5,
        name="Curriculum",
        recipe="recipes/phase5.py",
        config_class="trainers.curriculum_config:CurriculumConfig",
        finished_marker="phase5/forge_lineage.json",
        model_folders=_single("phase5"),
        paths=lambda run: {"output_dir": str(run / "phase5"), "model_name_or_path": str(run / "phase4")},
        resume=None,
        reports=("phase5/curriculum_report.json",),
        charts=(
            ("held-out pass@1 after each level", ("curriculum/pass@1_this_level", "curriculum/pass@1_levels_so_far")),
            ("training loss", ("train/loss",)),
        ),
    ),
    6: PhaseSpec(
        number=6,
        name="Tool & persona",
        recipe="recipes/phase6.py",
        config_class="trainers.persona_config:PersonaConfig",
        finished_marker="phase6/forge_lineage.json",
        model_folders=_single("phase6"),
        paths=lambda run: {"output_dir": str(run / "phase6"), "model_name_or_path": str(run / "phase5")},
        resume=None,
        reports=("phase6/ab_history.json",),
        charts=(("A/B scores after each cycle", ("ab/score_A", "ab/score_B")), ("winner gain", ("ab/gain",))),
    ),
}


def get_phase(number: int) -> PhaseSpec:
    """The spec of phase `number`; a KeyError names the phases that exist."""
    if number not in PHASES:
        raise KeyError(f"Phase {number} does not exist here. Phases: {sorted(PHASES)}.")
    return PHASES[number]


__all__ = ["PHASES", "TRACKING", "PhaseSpec", "get_phase"]
