"""Atomic output folders: a phase writes into a temporary sibling and renames it into place when complete, so a
folder that exists is a finished result and a crash never corrupts the last good output."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


def _normalise_permissions(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask, like a plain `open()`/`mkdir()`: mkdtemp makes the folder 0700 and
    transformers 5.x writes `model.safetensors` 0600 (a temporary file renamed), which other users could not read."""
    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final` in one rename.

    On an exception the temporary folder is removed and `final` (if it existed) is untouched. With
    `overwrite=False` an existing `final` is an error, since it holds a finished result.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already holds a finished output. Fix: choose another path or overwrite it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _normalise_permissions(staging)
    retired = None
    if final.exists():
        retired = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, retired)
    os.replace(staging, final)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


__all__ = ["atomic_directory", "current_umask", "remove_work_dir"]
