"""Phase 5's `pool_sampling`: a stratified pool holds every template of its level (round-robin), where a random pool
of the same size can miss one, which the level then never trains although held-out problems test it."""

from collections import Counter

import pytest

from evaluation.tasks import get_task_family
from trainers.curriculum_config import CurriculumConfig
from trainers.curriculum_trainer import TaskPool, pool_examples


def _templates(examples) -> Counter:
    return Counter(e.meta["template"] for e in examples)


def test_a_stratified_pool_covers_every_template_of_its_level_evenly_where_a_random_one_misses_some():
    family = get_task_family("code")
    level_templates = {t.id for t in family.templates_for(3)}
    assert len(level_templates) == 8
    # seed 2, level 3: the random pool of 16 misses 'clamp' (7 of its 24 held-out test problems are clamp tasks)
    random_pool = pool_examples(family, 3, 16, seed=2, sampling="random")
    assert [e.key for e in random_pool] == [e.key for e in family.generate("train", 16, seed=2, difficulty=3)]
    assert "clamp" not in _templates(random_pool) and len(_templates(random_pool)) == 6
    for seed in (0, 1, 2):
        pool = pool_examples(family, 3, 16, seed=seed, sampling="stratified")
        counts = _templates(pool)
        assert set(counts) == level_templates and set(counts.values()) == {2}
        assert len({e.key for e in pool}) == 16  # distinct tasks
        assert TaskPool(pool, family).stats()["templates"] == 8
    # fewer slots than templates: one task each for as many templates, in a seeded order; uneven sizes within one
    small = _templates(pool_examples(family, 3, 5, seed=0, sampling="stratified"))
    assert len(small) == 5 and set(small.values()) == {1}
    uneven = _templates(pool_examples(family, 3, 12, seed=0, sampling="stratified"))
    assert set(uneven) == level_templates and sorted(uneven.values()) == [1, 1, 1, 1, 2, 2, 2, 2]
    # deterministic per seed
    again = pool_examples(family, 3, 16, seed=1, sampling="stratified")
    assert [e.key for e in again] == [e.key for e in pool_examples(family, 3, 16, seed=1, sampling="stratified")]


def test_a_stratified_pool_stays_in_the_training_split():
    family = get_task_family("code")
    test_keys = {e.key for e in family.generate("test", 400, seed=0, difficulty=3)}
    pool = pool_examples(family, 3, 32, seed=0, sampling="stratified")
    assert len(pool) == 32 and not test_keys & {e.key for e in pool}


def test_pool_sampling_must_be_a_known_rule(tmp_path):
    values = {"output_dir": str(tmp_path / "phase5"), "model_name_or_path": "unused", "use_cpu": True,
              "report_to": "none"}  # fmt: skip
    assert CurriculumConfig(**values, pool_sampling="stratified").pool_sampling == "stratified"
    with pytest.raises(ValueError, match=r"CurriculumConfig\.pool_sampling is 'templates'.*Fix: use one of"):
        CurriculumConfig(**values, pool_sampling="templates")
    with pytest.raises(ValueError, match="pool sampling 'templates'"):
        pool_examples(get_task_family("code"), 3, 4, seed=0, sampling="templates")


def test_the_recipe_parser_sets_pool_sampling_both_ways(tmp_path):
    """`--pool_sampling` overrides the YAML's `stratified` (the recipe test checks the value reaches the pool)."""
    from pathlib import Path

    from recipes.phase5 import make_parser

    yaml = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "phase5_tiny.yaml"
    base = ["--config", str(yaml), "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    (default,) = make_parser().parse_args_and_config(args=base)
    (override,) = make_parser().parse_args_and_config(args=[*base, "--pool_sampling", "random"])
    assert (default.pool_sampling, override.pool_sampling) == ("stratified", "random")
