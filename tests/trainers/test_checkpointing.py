"""Atomic output folders: complete or absent, never half-written."""

from pathlib import Path

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


def test_finished_folder_has_save_pretrained_permissions(tmp_path, tiny_config):
    """Not mkdtemp's 0700: the folder gets `save_pretrained`'s mode and every file a plain write's (umask applied;
    transformers 5.23 itself leaves `model.safetensors` 0600, which we widen to match its other files)."""
    import stat

    from modeling_forge import ForgeForCausalLM
    from trainers.phase_output import save_phase_output

    model = ForgeForCausalLM(tiny_config())
    reference = tmp_path / "reference"
    model.save_pretrained(reference)
    folder = save_phase_output(tmp_path / "phase1", model=model, tokenizer=None, phase=1, phase_name="cognate",
                               config={})  # fmt: skip

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(folder) == mode(reference)
    assert {p.name: mode(p) for p in folder.iterdir() if p.is_file()} == {
        p.name: mode(reference / "config.json") for p in folder.iterdir() if p.is_file()
    }


def test_atomic_file_writes_are_not_private(tmp_path):
    import stat

    from trainers.evomerge import write_atomic

    write_atomic(tmp_path / "state.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == stat.S_IMODE(
        (tmp_path / "plain.json").stat().st_mode
    )


def _killed_child(action) -> int:
    """Run `action()` in a forked child and return its exit status (-9 when it was killed by SIGKILL)."""
    import os

    pid = os.fork()
    if pid == 0:
        try:
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.mark.parametrize("kill_after_replace", [0, 1])
def test_kill_9_while_replacing_an_output_never_loses_the_last_good_one(tmp_path, kill_after_replace):
    """SIGKILL inside the staged write (0 renames done) or between retiring the old folder and renaming the new one
    in (1 rename done): the next writer or `finished_output` finds the last good output again, and no leftovers."""
    import os
    import signal

    import trainers.checkpointing as checkpointing
    from trainers.checkpointing import finished_output

    final = tmp_path / "phase3"
    with atomic_directory(final) as staging:
        (staging / "v").write_text("good")

    def overwrite_and_die():
        calls = []
        original = os.replace

        def replace(src, dst):
            if len(calls) == kill_after_replace:
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append((src, dst))
            original(src, dst)

        checkpointing.os.replace = replace
        with atomic_directory(final, overwrite=True) as staging:
            (staging / "v").write_text("new")

    assert _killed_child(overwrite_and_die) == -9
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers and all(".phase3." in name for name in leftovers)  # hidden, never under the final name
    assert finished_output(final) and (final / "v").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["phase3"]  # staging and retired folders cleared


def test_every_file_and_folder_is_flushed_before_the_rename(tmp_path, monkeypatch):
    """A power cut right after the rename must not leave a finished-looking folder with unflushed (empty) files."""
    import os

    from trainers import checkpointing

    flushed: list[str] = []
    renamed_after: list[list[str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def replace(src, dst) -> None:
        renamed_after.append(list(flushed))
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "fsync", fsync)
    monkeypatch.setattr(checkpointing.os, "replace", replace)
    final = tmp_path / "out"
    with atomic_directory(final) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "weights.bin").write_bytes(b"x" * 10)
        (staging / "config.json").write_text("{}")
        staging_name = str(staging)
    before_rename = set(renamed_after[-1])
    for name in ("sub/weights.bin", "config.json", "sub", ""):
        assert str(Path(staging_name) / name).rstrip("/") in before_rename, name
    assert flushed[-1] == str(tmp_path)  # the parent folder, after the rename, so the rename itself is durable
    assert (final / "sub" / "weights.bin").read_bytes() == b"x" * 10
