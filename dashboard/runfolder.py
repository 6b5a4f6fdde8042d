"""Reading a run folder as the phases left it: safe paths, phase reports, model cards, and the trackio database.

Nothing here writes into the run folder. Every path a client names goes through `safe_path`, which refuses
anything that resolves outside the run folder (`..`, absolute paths, symbolic links pointing out).
"""

import json
import re
import sqlite3
from pathlib import Path

from markdown_it import MarkdownIt

PHASE_IN_RUN_NAME = re.compile(r"phase(\d+)")
TRACKIO_DIRNAME = "trackio"
MAX_REPORT_BYTES = 2_000_000


class OutsideRunFolder(ValueError):
    """A requested path resolves outside the run folder."""


def safe_path(run_dir: Path, relative: str) -> Path:
    """`run_dir / relative`, resolved; raises `OutsideRunFolder` if it lies outside `run_dir` (links included)."""
    root = run_dir.resolve()
    if "\x00" in relative or Path(relative).is_absolute():
        raise OutsideRunFolder(relative)
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise OutsideRunFolder(relative)
    return target


def read_report(path: Path) -> object | None:
    """A phase report: JSON, or JSON Lines as a list; None when absent or too large to send to a page."""
    if not path.is_file() or path.stat().st_size > MAX_REPORT_BYTES:
        return None
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError:
        return None  # being written (reports are replaced atomically, so this is rare): read it next time


def render_card(folder: Path, run_dir: Path) -> dict:
    """A model card (`README.md`) as HTML, its YAML front matter as text, and image links pointed at `/files/`."""
    text = (folder / "README.md").read_text()
    front = ""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end > 0:
            front, text = text[4:end], text[end + 4 :]
    relative = folder.resolve().relative_to(run_dir.resolve()).as_posix()
    # Card images are relative to the model folder (`plots/x.png`); served from the run folder instead.
    text = re.sub(r"\]\((?!https?:|/)([^)\s]+)\)", lambda m: f"](/files/{relative}/{m.group(1)})", text)
    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)  # raw HTML in a card is escaped
    return {"folder": relative, "front_matter": front, "html": html}


def model_summary(folder: Path, run_dir: Path) -> dict:
    """Name, lineage metrics and plot URLs of one finished model folder."""
    relative = folder.resolve().relative_to(run_dir.resolve()).as_posix()
    lineage = read_report(folder / "forge_lineage.json") or {}
    plots = sorted(p.relative_to(folder).as_posix() for p in (folder / "plots").glob("*.png"))
    return {
        "name": folder.name,
        "folder": relative,
        "model_name": lineage.get("model_name"),
        "wall_time_s": lineage.get("wall_time_s"),
        "metrics": lineage.get("metrics", {}),
        "plots": [f"/files/{relative}/{p}" for p in plots],
        "has_card": (folder / "README.md").exists(),
    }


def phase_of_run(run_name: str) -> int | None:
    """The phase a tracking run belongs to, from its name (`tiny-phase1-reasoning`, `outputs/tiny/phase4`)."""
    match = PHASE_IN_RUN_NAME.search(run_name)
    return int(match.group(1)) if match else None


class TrackioReader:
    """Reads metric and alert rows of every trackio project database in `<run>/trackio/` (read-only)."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / TRACKIO_DIRNAME

    def _databases(self) -> list[Path]:
        return sorted(self.folder.glob("*.db")) if self.folder.is_dir() else []

    def metrics(self, after: dict[str, int] | None = None) -> list[dict]:
        """Metric rows with id above `after[project]`: {project, id, run, phase, step, metrics} (numbers only)."""
        after = after or {}
        out = []
        for db in self._databases():
            for project, (row_id, run_name, step, payload) in self._query_one(
                db,
                "SELECT id, run_name, step, metrics FROM metrics WHERE id > ? ORDER BY id",
                (after.get(db.stem, 0),),
            ):
                values = {k: v for k, v in json.loads(payload).items() if isinstance(v, int | float)}
                x = values.get("train/global_step", step)
                out.append({"project": project, "id": row_id, "run": run_name, "phase": phase_of_run(run_name),
                            "step": x, "metrics": values})  # fmt: skip
        return out

    def alerts(self, after: dict[str, int] | None = None) -> list[dict]:
        """Alert rows with id above `after[project]`: {project, id, run, phase, title, text, level, timestamp}."""
        after = after or {}
        out = []
        for db in self._databases():
            for project, (row_id, run_name, title, text, level, stamp) in self._query_one(
                db, "SELECT id, run_name, title, text, level, timestamp FROM alerts WHERE id > ? ORDER BY id",
                (after.get(db.stem, 0),),
            ):  # fmt: skip
                out.append({"project": project, "id": row_id, "run": run_name, "phase": phase_of_run(run_name),
                            "title": title, "text": text, "level": level, "timestamp": stamp})  # fmt: skip
        return out

    def _query_one(self, db: Path, sql: str, args: tuple) -> list[tuple[str, tuple]]:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0) as connection:
                return [(db.stem, row) for row in connection.execute(sql, args)]
        except sqlite3.OperationalError:  # table not created yet, or the writer holds the lock: next poll
            return []


__all__ = [
    "OutsideRunFolder",
    "TrackioReader",
    "model_summary",
    "phase_of_run",
    "read_report",
    "render_card",
    "safe_path",
]
