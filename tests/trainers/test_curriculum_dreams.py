"""Phase 5's dream consolidation: with `dream_filter: verified` only the model's own programs that pass their task's
tests in the sandbox train (distinct ones, mixed with real solutions); 'none' keeps every dream unchecked; nothing a
dream wrote runs outside the sandbox; the settings are validated."""

import pytest
import torch

from evaluation import sandbox
from evaluation.tasks import get_task_family
from modeling_forge import ForgeConfig, ForgeForCausalLM
from tests.trainers.scripted_policy import ScriptedPolicy
from trainers import curriculum_trainer
from trainers.curriculum_config import CurriculumConfig
from trainers.curriculum_trainer import dream, dream_pairs, levels_to_dream, training_completion

needs_bwrap = pytest.mark.skipif(not sandbox.isolation_available(), reason="bubblewrap is not usable here")


def _config(tmp_path, **overrides) -> CurriculumConfig:
    # no dream variants unless a test asks (they have their own test), so the counts below are the dreams'
    values = {"output_dir": str(tmp_path / "phase5"), "model_name_or_path": "unused", "use_cpu": True,
              "report_to": "none", "dream_samples": 4, "dream_samples_per_task": 4,
              "dream_variants": 0}  # fmt: skip
    return CurriculumConfig(**{**values, **overrides})


def _references(family, levels, config, seed) -> dict[str, str]:
    """prompt -> reference body of the tasks `dream_pairs` draws (the same draw: split, count, seed, level)."""
    per_level = max(1, config.dream_samples // len(levels))
    return {e.prompt: e.target for lv in levels for e in family.generate("train", per_level, seed=seed, difficulty=lv)}


def _dreamer(references: dict[str, str], marker) -> ScriptedPolicy:
    """Per task: the reference, the same program behind a thought span (a duplicate once thoughts are stripped), a
    program that fails its tests, and the reference after a line that writes `marker` on the host (only possible
    outside the sandbox, whose /tmp is private and whose root is read-only)."""
    escape = f"    open({str(marker)!r}, 'w').write('ran outside the sandbox')\n"
    samples = [lambda body: body, lambda body: "<think>the same program</think>" + body,
               lambda body: "    raise ValueError('wrong')\n", lambda body: escape + body]  # fmt: skip
    return ScriptedPolicy(lambda prompt, i: samples[i](references[prompt]))


@needs_bwrap
def test_verified_dreams_keep_only_distinct_programs_that_pass_and_never_run_outside_the_sandbox(tmp_path):
    family = get_task_family("code")
    config = _config(tmp_path, dream_temperature=0.9)
    references = _references(family, [1, 2], config, seed=5)
    marker = tmp_path / "escaped"
    policy = _dreamer(references, marker)
    pairs, stats = dream_pairs(policy, family, [1, 2], config, seed=5)
    assert policy.calls == [{"temperature": 0.9, "num_samples": 4, "prompts": 4}]  # 2 tasks per level, 4 samples
    assert not marker.exists()  # the escaping dream ran, in the sandbox, and failed there
    assert (stats["generated"], stats["passed"], stats["kept"], stats["programs"]) == (16, 8, 4, 16)
    assert stats["per_level"] == {1: {"generated": 8, "passed": 4, "kept": 2}, 2: {"generated": 8, "passed": 4,
                                                                              "kept": 2}}  # fmt: skip
    assert sorted((p.prompt, p.completion) for p in pairs) == sorted(
        (prompt, training_completion(body)) for prompt, body in references.items()
    )
    assert {p.kind for p in pairs} == {"dream"} and sorted(p.level for p in pairs) == [1, 1, 2, 2]
    # re-run what trains: every kept program passes its task's tests
    examples = {e.prompt: e for lv in (1, 2) for e in family.generate("train", 2, seed=5, difficulty=lv)}
    results = family.run([examples[p.prompt] for p in pairs], [p.completion for p in pairs])
    assert all(r is not None and r.passed for r in results)


@needs_bwrap
def test_kept_dreams_can_bring_their_verified_constant_variants(tmp_path):
    family = get_task_family("code")
    config = _config(tmp_path, dream_variants=2)
    references = _references(family, [1, 2], config, seed=5)
    pairs, stats = dream_pairs(_dreamer(references, tmp_path / "escaped"), family, [1, 2], config, seed=5)
    variants = [p for p in pairs if p.kind == "variant"]
    assert stats["kept"] == 4 and 0 < stats["variants"] == len(variants) == len(pairs) - 4 <= 2 * 4
    assert stats["programs"] == 16 + stats["variant_candidates"]  # the variants ran in the sandbox too
    assert all(p.prompt not in references for p in variants) and {p.level for p in variants} <= {1, 2}


def test_unfiltered_dreams_keep_every_sample_and_run_nothing(tmp_path, monkeypatch):
    family = get_task_family("code")
    config = _config(tmp_path, dream_filter="none", dream_variants=2)  # variants need verified dreams: none
    references = _references(family, [1, 2], config, seed=5)
    marker = tmp_path / "escaped"

    def no_run(*args, **kwargs):
        raise AssertionError("unfiltered dreams must not be executed")

    monkeypatch.setattr(family, "run", no_run)
    pairs, stats = dream_pairs(_dreamer(references, marker), family, [1, 2], config, seed=5)
    assert (stats["generated"], stats["passed"], stats["kept"], stats["programs"]) == (16, None, 16, 0)
    assert any("raise ValueError" in p.completion for p in pairs)  # failing programs train too: the old behaviour
    assert not marker.exists()


def _tiny_model(tokenizer) -> ForgeForCausalLM:
    torch.manual_seed(0)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    return ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), **ids))


@needs_bwrap
def test_the_dream_epoch_trains_on_kept_dreams_and_real_solutions_and_is_skipped_when_none_pass(
    tmp_path, tiny_tokenizer, monkeypatch
):
    family = get_task_family("code")
    config = _config(tmp_path, optimizer_type="adamw", learning_rate=1e-3, per_device_train_batch_size=4,
                     max_length=128, logging_steps=1, dream_lr_scale=0.25)  # fmt: skip
    rates = []

    class Recording(curriculum_trainer.ForgeTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rates.append(self.args.learning_rate)

    monkeypatch.setattr(curriculum_trainer, "ForgeTrainer", Recording)
    references = _references(family, [1], config, seed=3)
    model = _tiny_model(tiny_tokenizer)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = dream(model, tiny_tokenizer, _dreamer(references, tmp_path / "escaped"), family, [1], config, tmp_path,
                   seed=3)  # fmt: skip
    assert (result["generated"], result["passed"], result["kept"], result["real"]) == (16, 8, 4, 4)
    assert result["train"]["examples"] == 8 and result["train"]["steps"] == 2 and not result["skipped"]
    assert rates == [pytest.approx(2.5e-4)]  # dream_lr_scale x learning_rate
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert result["heldout_nll_after"] != result["heldout_nll_before"]

    # every dream fails its tests: nothing trains (real solutions alone would be replay, not consolidation)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    failing = ScriptedPolicy(lambda prompt, i: "    raise ValueError('wrong')\n")
    result = dream(model, tiny_tokenizer, failing, family, [1], config, tmp_path, seed=3)
    assert (result["generated"], result["passed"], result["kept"], result["real"]) == (16, 0, 0, 0)
    assert result["skipped"] and result["heldout_nll_after"] == result["heldout_nll_before"]
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items()) and len(rates) == 1


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"dream_filter": "passing"}, "dream_filter"),
        ({"dream_samples_per_task": 0}, "dream_samples_per_task"),
        ({"dream_samples_per_task": 2.5}, "dream_samples_per_task"),
        ({"dream_temperature": 0.0}, "dream_temperature"),
        ({"dream_levels": "previous"}, "dream_levels"),
        ({"dream_lr_scale": 0.0}, "dream_lr_scale"),
        ({"dream_variants": -1}, "dream_variants"),
        ({"dream_lr_scale": 1.5}, "dream_lr_scale"),
    ],
)
def test_dream_settings_are_validated_naming_the_field_and_the_fix(tmp_path, overrides, name):
    with pytest.raises(ValueError, match=rf"CurriculumConfig\.{name} .*Fix: "):
        _config(tmp_path, **overrides)


def test_verified_dreams_are_the_default_and_the_unfiltered_ones_stay_reachable(tmp_path):
    default = CurriculumConfig(output_dir=str(tmp_path / "phase5"), model_name_or_path="unused", use_cpu=True)
    assert (default.dream_samples, default.dream_samples_per_task, default.dream_variants) == (256, 4, 4)
    assert (default.dream_filter, default.dream_temperature, default.dream_levels, default.dream_lr_scale) == (
        "verified",
        1.0,
        "earlier",
        0.3,
    )
    old = _config(tmp_path, dream_filter="none", dream_temperature=1.5, dream_samples_per_task=1, dream_levels="all",
                  dream_lr_scale=1.0)  # fmt: skip
    assert (old.dream_filter, old.dream_temperature, old.dream_samples_per_task, old.dream_levels) == (
        "none",
        1.5,
        1,
        "all",
    )


def test_dreams_replay_all_levels_so_far_or_only_the_earlier_ones():
    assert levels_to_dream([3], "all") == [3] and levels_to_dream([3, 4], "all") == [3, 4]
    assert levels_to_dream([3], "earlier") == [] and levels_to_dream([3, 4, 5], "earlier") == [3, 4]
    with pytest.raises(ValueError, match="dream_levels .*Fix"):
        levels_to_dream([3], "current")
