"""Atomic output folders: complete or absent, never half-written."""

import pytest

from trainers.checkpointing import atomic_directory


def test_folder_appears_only_when_complete(tmp_path):
    final = tmp_path / "phase1"
    with atomic_directory(final) as staging:
        (staging / "model.safetensors").write_text("weights")
        assert not final.exists()
    assert (final / "model.safetensors").read_text() == "weights"
    assert [p.name for p in tmp_path.iterdir()] == ["phase1"]


def test_crash_keeps_the_last_good_output(tmp_path):
    final = tmp_path / "phase1"
    with atomic_directory(final) as staging:
        (staging / "v").write_text("good")
    with pytest.raises(RuntimeError), atomic_directory(final, overwrite=True) as staging:
        (staging / "v").write_text("half")
        raise RuntimeError("crash mid-phase")
    assert (final / "v").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["phase1"]
    with pytest.raises(FileExistsError, match="finished output"):
        with atomic_directory(final):
            pass
    with atomic_directory(final, overwrite=True) as staging:
        (staging / "v").write_text("new")
    assert (final / "v").read_text() == "new"
