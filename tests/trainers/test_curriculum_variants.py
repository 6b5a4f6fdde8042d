"""Phase 5's training-step options: `success_variants` (each verified success also trains on variants of its task whose
program is the success with the constants rewritten, kept only when it passes the variant's tests in the sandbox) and
`experience_buffer` (each round also trains on the level's earlier verified pairs)."""

import pytest

from evaluation import sandbox
from evaluation.tasks import get_task_family
from tests.trainers.scripted_policy import ScriptedPolicy
from trainers.curriculum_config import CurriculumConfig
from trainers.curriculum_trainer import TaskPool, rewrite_constants, run_level
from trainers.teachers import get_teacher

needs_bwrap = pytest.mark.skipif(not sandbox.isolation_available(), reason="bubblewrap is not usable here")


def _config(tmp_path, **overrides) -> CurriculumConfig:
    values = {"output_dir": str(tmp_path / "phase5"), "model_name_or_path": "unused", "pool_size": 3,
              "attempts_per_round": 3, "max_rounds": 2, "use_cpu": True, "report_to": "none"}  # fmt: skip
    return CurriculumConfig(**{**values, **overrides})


def test_rewrite_changes_every_constant_literal_at_once_and_refuses_what_it_cannot_carry():
    # simultaneous: a 3 -> 5 and a 5 -> 7 do not chain; other numbers (13, 3.5, x3) stay
    body = "    y = 3 * x + 5\n    return y + 13 + x3 + 3.5\n"
    assert (
        rewrite_constants(body, {"a": 3, "b": 5}, {"a": 5, "b": 7})
        == "    y = 5 * x + 7\n    return y + 13 + x3 + 3.5\n"
    )
    # negative constants keep the sign the code writes (`x - 5` for -5); a sign change is refused
    assert rewrite_constants("    return x - 5\n", {"b": -5}, {"b": -9}) == "    return x - 9\n"
    assert rewrite_constants("    return x - 5\n", {"b": -5}, {"b": 9}) is None
    # strings as quoted literals, either quote
    assert rewrite_constants("    return s.replace('a', \"b\")\n", {"a": "a", "b": "b"}, {"a": "q", "b": "z"}) == (
        "    return s.replace('q', \"z\")\n"
    )
    # a changed constant the code does not write (it does not copy it), a clash, a list: no candidate
    assert rewrite_constants("    return x + 2 + 2\n", {"c": 4}, {"c": 6}) is None
    assert rewrite_constants("    return x * 4 + 4\n", {"a": 4, "b": 4}, {"a": 5, "b": 6}) is None
    assert rewrite_constants("    return x\n", {"c": [1]}, {"c": [2]}) is None
    assert rewrite_constants("    return x + 4\n", {"c": 4}, {"c": 4}) is None  # nothing changed


class _Recording:
    """The code family, remembering every variant it renders (so a test can re-run a trained variant's tests)."""

    def __init__(self, family):
        self.family, self.rendered = family, {}

    def make_variant(self, example, seed=0):
        variant = self.family.make_variant(example, seed)
        self.rendered[variant.prompt] = variant
        return variant

    def __getattr__(self, name):
        return getattr(self.family, name)


def _memorizing_body(example) -> str:
    """The reference body behind a guard that only lets the task's own test inputs through: it passes the task's
    tests, but the same code with the variant's constants fails the variant's (other) inputs."""
    name = example.meta["entry_point"]
    arguments = [case["call"][len(name) + 1 : -1] for case in example.meta["test_cases"]]
    guard = f"    if [*locals().values()] not in [{', '.join(f'[{a}]' for a in arguments)}]:\n        return None\n"
    return guard + example.target


@needs_bwrap
def test_each_success_trains_its_verified_constant_variants_and_a_memorized_one_gives_none(tmp_path):
    family = _Recording(get_task_family("code", require_isolation=True))
    examples = family.generate("train", 3, seed=11, difficulty=2)
    references = {e.prompt: e.target for e in examples}
    trained: list = []
    config = _config(tmp_path, max_rounds=1, success_variants=3)
    answers = ScriptedPolicy(lambda prompt, _: references[prompt])
    rounds = run_level(TaskPool(examples, family), answers, get_teacher("procedural"),
                       lambda pairs: trained.append(pairs) or {}, level=2, config=config)  # fmt: skip
    pairs = trained[0]
    assert [p.kind for p in pairs] == ["success"] * 3 + ["variant"] * 9  # 3 verified variants per success
    assert rounds[0]["variant_candidates"] == 9 and rounds[0]["variant_pairs"] == 9
    assert rounds[0]["programs"] == 3 + 9  # the candidates ran in the sandbox
    variants = [family.rendered[p.prompt] for p in pairs if p.kind == "variant"]
    assert len({v.key for v in variants}) == 9 and not {v.prompt for v in variants} & set(references)
    assert all(v.meta["split"] == "train" for v in variants)  # never a held-out problem
    for variant, pair in zip(variants, pairs[3:], strict=True):  # the new constants, written by the rewrite
        assert all(str(abs(v)) in pair.completion for v in variant.meta["params"].values() if isinstance(v, int))
    results = family.run(variants, [p.completion for p in pairs[3:]])
    assert all(r is not None and r.passed for r in results)

    # a coder that memorized the task's test inputs passes them, but its rewritten programs fail: nothing trains
    memorized = {e.prompt: _memorizing_body(e) for e in examples}
    trained.clear()
    memorizing = ScriptedPolicy(lambda prompt, _: memorized[prompt])
    rounds = run_level(TaskPool(examples, family), memorizing, get_teacher("procedural"),
                       lambda pairs: trained.append(pairs) or {}, level=2, config=config)  # fmt: skip
    assert rounds[0]["successes"] == 3
    assert rounds[0]["variant_candidates"] == 9 and rounds[0]["variant_pairs"] == 0
    assert [p.kind for p in trained[0]] == ["success"] * 3

    # off (the default): no candidates, no extra sandbox runs
    trained.clear()
    answers = ScriptedPolicy(lambda prompt, _: references[prompt])
    rounds = run_level(TaskPool(examples, family), answers, get_teacher("procedural"),
                       lambda pairs: trained.append(pairs) or {}, level=2,
                       config=_config(tmp_path, max_rounds=1))  # fmt: skip
    assert rounds[0]["variant_candidates"] == 0 and rounds[0]["programs"] == 3
    assert [p.kind for p in trained[0]] == ["success"] * 3


@needs_bwrap
def test_hinted_successes_bring_variants_trained_without_the_hint(tmp_path):
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 2, seed=12, difficulty=1)
    bodies = {e.prompt: e.target for e in examples}

    def needs_the_solution(prompt, _sample):  # succeeds only when shown the whole reference as a prefix, then stops
        return "" if any(prompt.endswith(p + b) for p, b in bodies.items()) else "\n    return None\n"

    trained: list = []
    config = _config(tmp_path, max_rounds=1, pool_size=2, attempts_per_round=2, hint_solution_fractions=[1.0],
                     success_variants=2)  # fmt: skip
    rounds = run_level(TaskPool(examples, family), ScriptedPolicy(needs_the_solution), get_teacher("procedural"),
                       lambda pairs: trained.append(pairs) or {}, level=1, config=config)  # fmt: skip
    assert rounds[0]["hinted_successes"] == 2 and rounds[0]["variant_pairs"] == 4
    for pair in trained[0]:
        assert "#" not in pair.prompt and "Hint" not in pair.prompt
    assert sum(p.kind == "variant" for p in trained[0]) == 4


@needs_bwrap
def test_experience_buffer_adds_earlier_rounds_verified_pairs(tmp_path):
    family = _Recording(get_task_family("code", require_isolation=True))
    examples = family.generate("train", 3, seed=13, difficulty=1)
    trained: list = []

    def reference(prompt, _sample):  # pool tasks and the variants that replace them after each success
        rendered = {e.prompt: e for e in examples} | family.rendered
        return rendered[prompt].target

    for buffer in (0, 4):
        trained.clear()
        config = _config(tmp_path, max_rounds=3, experience_buffer=buffer)
        rounds = run_level(TaskPool(examples, family, successes_to_remove=99), ScriptedPolicy(reference),
                           get_teacher("procedural"), lambda pairs: trained.append(pairs) or {}, level=1,
                           config=config)  # fmt: skip
        assert [r["successes"] for r in rounds] == [3, 3, 3]
        assert [r["buffered"] for r in rounds] == ([0, 0, 0] if buffer == 0 else [0, 3, 4])  # capped at the size
        assert [len(batch) for batch in trained] == [3 + r["buffered"] for r in rounds]
        for index, batch in enumerate(trained):
            new, earlier = batch[:3], batch[3:]
            before = {p.prompt for b in trained[:index] for p in b[:3]}
            assert not {p.prompt for p in new} & before  # each round's own pairs are fresh variants
            assert {p.prompt for p in earlier} <= before and len({p.prompt for p in earlier}) == len(earlier)


@pytest.mark.parametrize("name", ["success_variants", "experience_buffer"])
@pytest.mark.parametrize("value", [-1, 1.5, "many"])
def test_the_counts_must_be_non_negative_integers(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"CurriculumConfig\.{name} .*Fix:"):
        _config(tmp_path, **{name: value})
    assert getattr(_config(tmp_path, **{name: 3}), name) == 3
