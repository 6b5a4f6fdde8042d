"""A sandbox that fails as a whole (bubblewrap missing where isolation is required) stops scoring with a clear error
instead of scoring the batch as zeros; a working sandbox still scores right and wrong bodies."""

import pytest

from evaluation import sandbox
from evaluation.tasks import get_task_family
from evaluation.tasks.code import SandboxFailedError


@pytest.fixture
def no_bwrap(monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    sandbox._bwrap_problem.cache_clear()
    yield
    sandbox._bwrap_problem.cache_clear()


def test_missing_bubblewrap_with_required_isolation_raises_naming_the_fix(no_bwrap):
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 2, seed=0, difficulty=1)
    with pytest.raises(SandboxFailedError, match="bubblewrap") as error:
        family.score_batch(examples, [e.target for e in examples])
    assert "Fix:" in str(error.value) and "apt-get install bubblewrap" in str(error.value)


def test_a_working_sandbox_scores_and_does_not_raise():
    if not sandbox.isolation_available():
        pytest.skip("bubblewrap is not usable on this machine")
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 2, seed=0, difficulty=1)
    assert family.score_batch(examples, [e.target for e in examples]) == [1.0, 1.0]
    assert family.score_batch(examples, ["    return None\n"] * 2) == [0.0, 0.0]
