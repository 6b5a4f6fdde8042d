"""Atomic output folders: a phase writes into a temporary sibling and renames it into place when complete, so a
folder that exists is a finished result and a crash never corrupts the last good output."""

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: POSIX has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_work_dir(path: str | os.PathLike) -> None:
    """Delete a phase's scratch folder (Trainer checkpoints, logs) once its result is safely in place."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _recover(final: Path) -> None:
    """Undo what a killed writer of `final` left behind: its staging folders go; a finished output it had retired
    (killed between the two renames) is put back, so the last good result is never lost."""
    retired = sorted(final.parent.glob(f".{final.name}.old-*"))
    if retired and not final.exists():
        logger.warning("Restoring %s from %s (a previous run was killed while replacing it).", final, retired[-1])
        os.replace(retired[-1], final)
        retired = retired[:-1]
    for leftover in [*final.parent.glob(f".{final.name}.tmp-*"), *retired]:
        logger.info("Removing %s, left by a run that was killed while writing %s.", leftover, final.name)
        shutil.rmtree(leftover, ignore_errors=True)


def finished_output(final: str | os.PathLike) -> bool:
    """Whether `final` holds a finished output, after undoing what a killed writer left (see `_recover`)."""
    final = Path(final)
    if final.parent.is_dir():
        _recover(final)
    return final.exists()


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a Trainer `checkpoint-N` folder was written to the end: `Trainer._save_checkpoint` writes the weights,
    optimizer, scheduler and RNG state, then `trainer_state.json` last; a killed save leaves that missing or cut."""
    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return has_weights and (folder / "optimizer.pt").exists()


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` under `folder` (None if there is none); incomplete ones, left by a run
    killed while saving, are removed so Trainer's rotation and `get_last_checkpoint` never pick them."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (m := CHECKPOINT_PATTERN.match(path.name))
    )
    for _, path in reversed(found):
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning("Removing the incomplete checkpoint %s (its save was interrupted).", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def _normalise_permissions(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask, like a plain `open()`/`mkdir()`: mkdtemp makes the folder 0700 and
    transformers 5.x writes `model.safetensors` 0600 (a temporary file renamed), which other users could not read."""
    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_path(path: Path) -> None:
    """Flush one file's or folder's contents to the disk (a folder's fsync makes the renames in it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:  # e.g. a folder on a file system that cannot be opened read-only: durability is best-effort
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up, so a power cut after the rename cannot leave empty files in a
    folder that looks finished (a rename is only ordered after the data when the data was flushed first)."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if not path.is_symlink():
            _fsync_path(path)
    _fsync_path(folder)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final` in one rename.

    On an exception the temporary folder is removed and `final` (if it existed) is untouched. With
    `overwrite=False` an existing `final` is an error, since it holds a finished result.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already holds a finished output. Fix: choose another path or overwrite it.")
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _normalise_permissions(staging)
    _fsync_tree(staging)
    retired = None
    if final.exists():
        retired = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, retired)
    os.replace(staging, final)
    _fsync_path(final.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


__all__ = [
    "atomic_directory",
    "current_umask",
    "finished_output",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "remove_work_dir",
]
