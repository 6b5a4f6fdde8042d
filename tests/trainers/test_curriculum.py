"""Phase 5 (curriculum): the loop's bookkeeping on a scripted model, placement on a model with known success rates,
LILO sampling, a sandbox-wide failure stopping the phase, and the recipe end to end on a tiny Phase 4 checkpoint."""

import json
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator, set_seed

from evaluation import sandbox
from evaluation.tasks import get_task_family
from evaluation.tasks.code import SandboxFailedError
from modeling_forge.bitnet import BitLinear
from recipes.phase5 import main, make_parser
from tests.trainers.scripted_policy import ScriptedPolicy
from trainers import curriculum_trainer
from trainers.curriculum_config import CurriculumConfig
from trainers.curriculum_trainer import (
    SolutionCache,
    TaskPool,
    backward_transfer,
    choose_start_level,
    generation_context,
    ladder_completion,
    ladder_prompt,
    masked_self_items,
    partial_solution,
    pass_at_k,
    place,
    run_level,
    strip_thoughts,
    with_hint,
)
from trainers.phase_output import weights_sha256
from trainers.teachers import ProceduralTeacher, Teacher, _RationaleTeacher, function_body, get_teacher

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
needs_bwrap = pytest.mark.skipif(not sandbox.isolation_available(), reason="bubblewrap is not usable here")


def _config(tmp_path, **overrides) -> CurriculumConfig:
    values = {"output_dir": str(tmp_path / "phase5"), "model_name_or_path": "unused", "pool_size": 4,
              "attempts_per_round": 4, "max_rounds": 3, "use_cpu": True, "report_to": "none"}  # fmt: skip
    values.update(overrides)
    return CurriculumConfig(**values)


def _without_hints(prompt: str) -> str:
    """The task prompt without the hint comment lines a retry puts above it."""
    return "".join(line + "\n" for line in prompt.splitlines() if not line.startswith("# "))


_REFERENCE: dict[str, str] = {}  # prompt -> reference body: what the scripted "perfect coder" answers


def _remember(examples) -> None:
    _REFERENCE.update({e.prompt: e.target for e in examples})


class _Variants:
    """Every example the family renders is remembered, so the scripted coder can solve variants too."""

    def __init__(self, family):
        self.family = family

    def make_variant(self, example, seed=0):
        variant = self.family.make_variant(example, seed)
        _remember([variant])
        return variant

    def __getattr__(self, name):
        return getattr(self.family, name)


# ----------------------------------------------------------------------------------------------------------------
# The loop's bookkeeping
# ----------------------------------------------------------------------------------------------------------------


@needs_bwrap
def test_successes_bring_variants_and_three_in_a_row_remove_a_task(tmp_path):
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 4, seed=0, difficulty=1)
    _remember(examples)
    pool = TaskPool(examples, _Variants(family), successes_to_remove=3)
    keys = {t.task_id: [t.example.key] for t in pool.tasks}
    policy = ScriptedPolicy(lambda p, i: "<think>the step</think>" + _REFERENCE[_without_hints(p)])
    trained: list = []

    def on_round(record):
        for task in pool.tasks:
            if not task.removed:
                keys[task.task_id].append(task.example.key)

    rounds = run_level(pool, policy, get_teacher("procedural"), lambda pairs: trained.append(pairs) or {},
                       level=1, config=_config(tmp_path), on_round=on_round)  # fmt: skip
    assert [r["pool_active"] for r in rounds] == [4, 4, 0]  # the pool shrinking is the mastery signal
    assert all(t.removed and t.successes == 3 and t.variants == 2 for t in pool.tasks)
    for task in pool.tasks:  # each success replaced the task by a variant: same template, new constants
        history = keys[task.task_id]
        assert len(set(history)) == 3
        assert len({k.split("|")[0] for k in history}) == 1
    assert all(r["hinted_attempts"] == 0 for r in rounds)
    pairs = [p for batch in trained for p in batch]
    assert len(pairs) == 12 and all(p.kind == "success" for p in pairs)
    assert all(p.completion.startswith("<think>the step</think>") for p in pairs)  # thoughts kept for training


@needs_bwrap
def test_failures_get_hints_and_hinted_successes_train_without_the_hint(tmp_path):
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 3, seed=1, difficulty=1)
    _remember(examples)

    def answer(prompt, index):  # fails unaided, succeeds when a hint is in context
        return _REFERENCE[_without_hints(prompt)] if prompt.startswith("# ") else "    return None\n"

    policy = ScriptedPolicy(answer)
    trained: list = []
    pool = TaskPool(examples, family)
    config = _config(tmp_path, max_rounds=2, pool_size=3, attempts_per_round=3)
    rounds = run_level(pool, policy, get_teacher("procedural"), lambda pairs: trained.append(pairs) or {},
                       level=1, config=config)  # fmt: skip
    assert [r["successes"] for r in rounds] == [0, 0] and [r["hinted_successes"] for r in rounds] == [3, 3]
    assert [r["pool_active"] for r in rounds] == [3, 3]  # hinted successes neither count nor remove
    for task in pool.tasks:
        assert task.streak == 0 and task.variants == 0 and len(task.hints) == 2
        assert (
            "expected value" in task.hints[0] and str(task.example.meta["test_cases"][0]["expected"]) in task.hints[0]
        )
    hinted_prompts = [p for p in policy.prompts if p.startswith("# ")]
    assert len(hinted_prompts) == 6 and all(
        h.splitlines()[0].startswith("# Your function returned") for h in hinted_prompts
    )
    pairs = [p for batch in trained for p in batch]
    assert len(pairs) == 6 and all(p.kind == "hinted" for p in pairs)
    prompts = {e.prompt for e in examples}
    assert all(p.prompt in prompts and "# " not in p.prompt and "Hint" not in p.prompt for p in pairs)


@needs_bwrap
def test_replay_adds_its_share_of_earlier_levels(tmp_path):
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 3, seed=2, difficulty=1)
    _remember(examples)
    replay = [curriculum_trainer.TrainingPair(f"p{i}", "c", "replay", 0) for i in range(10)]
    trained: list = []
    config = _config(tmp_path, max_rounds=1, pool_size=3, attempts_per_round=3, replay_share=0.25)
    run_level(TaskPool(examples, _Variants(family)), ScriptedPolicy(lambda p, i: _REFERENCE[_without_hints(p)]),
              get_teacher("procedural"), lambda pairs: trained.append(pairs) or {}, level=2, config=config,
              replay=replay)  # fmt: skip
    kinds = [p.kind for p in trained[0]]
    assert kinds.count("success") == 3 and kinds.count("replay") == 1  # 25% of the round's examples


def test_thoughts_are_stripped_before_execution_and_hints_go_above_the_function():
    assert strip_thoughts("<think><compute> x + 3</think>    return x + 3\n") == "    return x + 3\n"
    assert strip_thoughts("    return 1\n<think>unclosed thought") == "    return 1\n"
    assert with_hint("def f(x):\n", "Add 3.\nCheck f(0).") == "# Add 3.\n# Check f(0).\ndef f(x):\n"


# ----------------------------------------------------------------------------------------------------------------
# The hint ladder: later retries show part of the teacher's solution
# ----------------------------------------------------------------------------------------------------------------

BODY = "    total = 0\n    for item in items:\n        total += item\n    return total\n"
PROMPT = 'def f(items):\n    """Sum the items."""\n'


def test_ladder_rungs_show_the_hint_then_growing_parts_of_the_solution():
    assert partial_solution(BODY, 0.0) == "" and partial_solution(None, 1.0) == ""
    assert partial_solution(BODY, 1.0) == BODY  # whole: ends in its newline, only ending the function is left
    half = partial_solution(BODY, 0.5)
    assert half == "    total = 0\n    for item in items:" and BODY.startswith(half)  # cut back to whitespace
    assert partial_solution("    return x + 3\n", 0.7) == "    return"  # never inside a word
    assert ladder_prompt(PROMPT, "Add them.", "", "prefix") == with_hint(PROMPT, "Add them.")  # the prose rung
    assert ladder_prompt(PROMPT, "Add them.", half, "prefix") == f"# Add them.\n{PROMPT}{half}"
    assert ladder_prompt(PROMPT, "Add them.", half, "comment") == (
        f"# Add them.\n# Solution lines:\n#     total = 0\n#     for item in items:\n{PROMPT}"
    )
    # a prefix rung's program is the shown part plus the model's continuation, continuing the task's context
    ran = ladder_completion(PROMPT, half, "\n        total += item\n    return total\n", "prefix")
    assert PROMPT + ran == PROMPT + "\n" + BODY
    assert ladder_completion(PROMPT, half, "    return 0\n", "comment") == "    return 0\n"
    whole = ladder_prompt(PROMPT, "Add them.", partial_solution(BODY, 1.0), "prefix")
    assert whole == f"# Add them.\n{PROMPT}{BODY}" and ladder_completion(PROMPT, BODY, "", "prefix") == "\n" + BODY
    # the model continues a finished body on a new line, a half line where it stops, a task after its docstring
    assert generation_context(whole) == whole and generation_context(PROMPT) == PROMPT.rstrip()
    assert generation_context(ladder_prompt(PROMPT, "Add them.", half, "prefix")).endswith("for item in items:")


def _ladder_answer(form: str):
    """A scripted coder that fails unaided and with prose or half a solution, and succeeds only when the whole
    reference is shown: it then stops (prefix) or copies the commented lines (comment)."""

    def answer(prompt, index):
        if form == "prefix":
            for task_prompt, body in _REFERENCE.items():
                if prompt.endswith(task_prompt + body):
                    return ""
            return "\n    return None\n"
        lines = prompt.split("# Solution lines:\n", 1)
        if len(lines) == 2:
            shown = [line[2:] for line in lines[1].splitlines() if line.startswith("# ")]
            task = lines[1].split("\n", len(shown))[-1]
            if "\n".join(shown) + "\n" == _REFERENCE[task]:
                return "\n" + "\n".join(shown) + "\n"
        return "    return None\n"

    return answer


@needs_bwrap
@pytest.mark.parametrize("form", ["prefix", "comment"])
def test_a_coder_that_needs_the_solution_gets_hinted_successes_trained_without_it(tmp_path, form):
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 3, seed=4, difficulty=2)
    _remember(examples)
    policy = ScriptedPolicy(_ladder_answer(form))
    trained: list = []
    pool = TaskPool(examples, family)
    config = _config(tmp_path, max_rounds=2, pool_size=3, attempts_per_round=3,
                     hint_solution_fractions=[0.0, 0.5, 1.0], hint_solution_format=form)  # fmt: skip
    assert config.hint_retries == 3
    rounds = run_level(pool, policy, get_teacher("procedural"), lambda pairs: trained.append(pairs) or {},
                       level=2, config=config)  # fmt: skip
    for record in rounds:  # per rung: attempts, solutions shown, successes
        assert [r["fraction"] for r in record["rungs"]] == [0.0, 0.5, 1.0]
        assert [r["attempts"] for r in record["rungs"]] == [3, 3, 3]
        assert [r["successes"] for r in record["rungs"]] == [0, 0, 3]
        assert record["rungs"][0]["solution_shown"] == 0 and record["rungs"][2]["solution_shown"] == 3
        assert record["successes"] == 0 and record["hinted_successes"] == 3
    assert pool.stats()["hinted_successes_per_rung"] == [0, 0, 6]
    assert all(t.rung_successes == [0, 0, 2] for t in pool.tasks)
    pairs = [p for batch in trained for p in batch]
    assert len(pairs) == 6 and all(p.kind == "hinted" for p in pairs)
    for pair in pairs:  # trained without hint or solution in context; the completion is the verified program
        assert pair.prompt in {e.prompt for e in examples}
        assert "#" not in pair.prompt and "Hint" not in pair.prompt and "Solution" not in pair.prompt
        assert "#" not in pair.completion
        assert pair.completion.strip() == _REFERENCE[pair.prompt].strip()
    shown = [p for p in policy.prompts if "return None" not in p and p.startswith("# ")]
    assert len(shown) == 18  # 3 rungs x 3 tasks x 2 rounds
    if form == "prefix":  # the 0.5 rung writes half the body into the function
        assert any(p.endswith(partial_solution(_REFERENCE[e.prompt], 0.5)) and partial_solution(
            _REFERENCE[e.prompt], 0.5) for p in shown for e in examples)  # fmt: skip


@needs_bwrap
def test_hinted_successes_can_bring_variants_without_counting_towards_removal(tmp_path):
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 2, seed=7, difficulty=1)
    _remember(examples)
    pool = TaskPool(examples, _Variants(family))
    trained: list = []
    config = _config(tmp_path, max_rounds=2, pool_size=2, attempts_per_round=2, hint_solution_fractions=[1.0],
                     variant_after_hinted_success=True)  # fmt: skip
    run_level(pool, ScriptedPolicy(_ladder_answer("prefix")), get_teacher("procedural"),
              lambda pairs: trained.append(pairs) or {}, level=1, config=config)  # fmt: skip
    assert all(t.variants == 2 and t.streak == 0 and not t.removed and t.rung_successes == [2] for t in pool.tasks)
    prompts = [p.prompt for batch in trained for p in batch]
    assert len(prompts) == 4 and len(set(prompts)) == 4  # a fresh instance each round, not the same one again


class _NoSolutions(Teacher):
    name = "no-solutions"

    def annotate(self, examples):
        return [None] * len(examples)


@needs_bwrap
def test_a_teacher_without_solutions_stops_the_ladder_at_prose_hints(tmp_path, caplog):
    family = get_task_family("code", require_isolation=True)
    examples = family.generate("train", 2, seed=5, difficulty=1)
    _remember(examples)
    policy = ScriptedPolicy(_ladder_answer("prefix"))
    config = _config(tmp_path, max_rounds=1, pool_size=2, attempts_per_round=2, hint_solution_fractions=[0.0, 1.0])
    with caplog.at_level("WARNING"):
        rounds = run_level(TaskPool(examples, family), policy, _NoSolutions(), lambda pairs: {}, level=1,
                           config=config)  # fmt: skip
    assert [r["solution_shown"] for r in rounds[0]["rungs"]] == [0, 0]
    assert [r["successes"] for r in rounds[0]["rungs"]] == [0, 0]
    assert "gave no verified solution for 2 of 2 tasks" in caplog.text
    assert all(p.startswith("# ") and not p.rstrip().endswith("return") for p in policy.prompts[2:])


class _WritesCode(_RationaleTeacher):
    """A language-model teacher whose replies are scripted: right for the first task, wrong for the second."""

    name = "scripted-lm"

    def __init__(self, replies):
        super().__init__()
        self.replies = replies

    def rationales(self, questions):
        return [self.replies[i % len(self.replies)] for i in range(len(questions))]


@needs_bwrap
def test_a_language_model_teachers_solutions_are_parsed_and_verified_before_they_are_shown():
    family = get_task_family("code", require_isolation=True)
    right, wrong = family.generate("train", 2, seed=6, difficulty=1)
    name = right.meta["entry_point"]
    reply = f"Here:\n```python\n{right.prompt}{right.target}```\nDone."
    assert function_body(reply, name) == right.target
    assert function_body("no code here", name) is None
    assert ProceduralTeacher().solutions([right]) == [right.target]
    cache = SolutionCache(_WritesCode([reply, "```python\ndef g(x):\n    return -12345\n```"]), family)
    assert cache.get([right, wrong]) == [right.target, None]  # the wrong one failed its tests in the sandbox
    assert cache.programs == 2
    assert cache.get([right]) == [right.target] and cache.programs == 2  # asked and checked once per task


# ----------------------------------------------------------------------------------------------------------------
# Placement and sampling
# ----------------------------------------------------------------------------------------------------------------


@needs_bwrap
def test_placement_starts_at_the_level_whose_success_is_nearest_half(tmp_path):
    family = get_task_family("code", require_isolation=True)
    config = _config(tmp_path, levels=[1, 4], placement_problems=4, placement_k=4)
    known = {1: 1.0, 2: 0.75, 3: 0.5, 4: 0.0}  # pass@1 per level of the scripted model
    level_of = {}
    for level in range(1, 5):
        examples = family.generate("validation", 4, seed=config.seed, difficulty=level)
        _remember(examples)
        level_of.update({e.prompt: level for e in examples})

    def answer(prompt, index):  # sample i is right for the first known[level] share of the k samples
        return _REFERENCE[prompt] if index < known[level_of[prompt]] * 4 else "    return None\n"

    placement = place(ScriptedPolicy(answer), family, config)
    assert {lv: r["pass@1"] for lv, r in placement["per_level"].items()} == known
    assert placement["per_level"][2]["pass@4"] == 1.0 and placement["per_level"][4]["pass@4"] == 0.0
    assert placement["start_level"] == 3
    assert placement["programs"] == 4 * 4 * 4


def test_start_level_rule_and_pass_at_k():
    assert choose_start_level({1: 0.9, 2: 0.6, 3: 0.1}) == 2
    assert choose_start_level({1: 0.0, 2: 0.0}) == 1  # nothing solved: the easiest level
    assert choose_start_level({1: 0.7, 2: 0.3}) == 1  # a tie goes to the easier level
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9))


def test_lilo_sampling_prefers_tasks_near_half_success():
    family = get_task_family("code")
    pool = TaskPool(family.generate("train", 10, seed=0, difficulty=1), family)
    for task in pool.tasks[:5]:  # mastered-looking tasks: 19 of 20 solved
        task.attempts, task.successes = 20, 19
    for task in pool.tasks[5:]:  # edge tasks: half solved
        task.attempts, task.successes = 20, 10
    rng = random.Random(0)
    picks = [t.task_id for _ in range(200) for t in pool.sample(2, rng, "lilo")]
    edge = sum(1 for i in picks if i >= 5) / len(picks)
    assert edge > 0.75
    uniform = [t.task_id for _ in range(200) for t in pool.sample(2, rng, "uniform")]
    assert 0.4 < sum(1 for i in uniform if i >= 5) / len(uniform) < 0.6


def test_self_model_items_mask_only_generated_tokens(tiny_tokenizer):
    rng = random.Random(0)
    item = masked_self_items(tiny_tokenizer, "def f(x):\n", "    return x + 1\n", 0.5, rng, 128)
    prompt_len = len(tiny_tokenizer("def f(x):")["input_ids"])  # the context: the prompt without trailing space
    masked = [i for i, label in enumerate(item["labels"]) if label != -100]
    assert masked and min(masked) >= prompt_len
    assert all(item["input_ids"][i] == tiny_tokenizer.pad_token_id for i in masked)
    full = tiny_tokenizer("    return x + 1\n", add_special_tokens=False)["input_ids"]
    assert len(masked) == round(0.5 * len(full))


def test_backward_transfer_is_final_minus_right_after():
    records = [{"level": 1, "success_after": {"1": 0.5}}, {"level": 2, "success_after": {"1": 0.25, "2": 0.5}}]
    assert backward_transfer([1, 2], records) == {"bwt": -0.25, "per_level": {1: -0.25}}
    assert backward_transfer([1], records[:1])["bwt"] is None


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"levels": [3, 2]}, "levels"),
        ({"task_sampling": "greedy"}, "task_sampling"),
        ({"dream_real_share": 0.0}, "dream_real_share"),
        ({"teacher": "oracle"}, "teacher"),
        ({"model_name_or_path": None}, "model_name_or_path"),
        ({"bake": {"fraction": 2.0}}, "bake"),
        ({"hint_solution_fractions": [0.5, 0.2]}, "hint_solution_fractions"),
        ({"hint_solution_fractions": [0.0, 1.5]}, "hint_solution_fractions"),
        ({"hint_solution_fractions": [0.0, 1.0], "hint_retries": 1}, "hint_solution_fractions"),
        ({"hint_solution_format": "inline"}, "hint_solution_format"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(tmp_path, overrides, name):
    with pytest.raises(ValueError, match=rf"CurriculumConfig\.{name} .*(Fix|fraction)"):
        _config(tmp_path, **overrides)
    _config(tmp_path)  # and the defaults are valid


def test_hint_ladder_defaults_follow_hint_retries_or_the_fractions(tmp_path):
    assert (_config(tmp_path).hint_retries, _config(tmp_path).hint_solution_fractions) == (1, [0.0])
    assert _config(tmp_path, hint_retries=2).hint_solution_fractions == [0.0, 0.0]
    assert _config(tmp_path, hint_solution_fractions="[0, 0.5, 1]").hint_retries == 3
    assert _config(tmp_path, hint_retries=0).hint_solution_fractions == []


# ----------------------------------------------------------------------------------------------------------------
# The recipe end to end on a tiny Phase 4 (ternary, packed) checkpoint
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phase4_checkpoint(tmp_path_factory, corpus_ready) -> Path:
    """A tiny Phase-4-like folder: the tiny preset trained 30 steps on code tasks, every linear layer ternary and
    packed, an 8-bit embedding (~15 s)."""
    from evaluation.corpus import corpus_texts
    from modeling_forge import ForgeConfig, ForgeForCausalLM
    from modeling_forge.bitnet import BitNetLayout, bitnet_candidates, convert_to_bitnet, pack_bitnet
    from modeling_forge.tokenization import build_tokenizer
    from trainers.base import ForgeTrainer
    from trainers.data import pack_texts
    from trainers.phase_output import save_phase_output

    started = time.time()
    set_seed(0)
    folder = tmp_path_factory.mktemp("run") / "phase4"
    tokenizer = build_tokenizer(corpus_texts("train", max_chars=200_000), 512)
    family = get_task_family("code")
    texts = [family.training_text(e) for e in family.generate("train", 200, seed=0, difficulty=1)]
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    model = ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=len(tokenizer), **ids))
    args = TrainingArguments(output_dir=str(folder.parent / "work"), max_steps=30, per_device_train_batch_size=16,
                             learning_rate=3e-3, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True)  # fmt: skip
    ForgeTrainer(model=model, args=args, train_dataset=pack_texts(texts, tokenizer, 128),
                 data_collator=default_data_collator).train()  # fmt: skip
    convert_to_bitnet(model, BitNetLayout(modules=bitnet_candidates(model), embedding_bits=8))
    pack_bitnet(model)
    save_phase_output(folder, model=model, tokenizer=tokenizer, phase=4, phase_name="bitnet",
                      config={"fixture": "tiny, 30 steps, ternary"}, seed=0,
                      wall_time_s=time.time() - started)  # fmt: skip
    return folder


FAST = ["--levels", "[1, 2]", "--placement_problems", "2", "--placement_k", "1", "--pool_size", "3",
        "--attempts_per_round", "3", "--max_rounds", "1", "--eval_problems", "2", "--self_model_bands", "[2, 2]",
        "--bake", '{"steps": 2, "num_samples": 4, "eval_samples": 4, "max_new_tokens": 6, "batch_size": 4}',
        "--dream_samples", "2", "--max_new_tokens", "16", "--learning_rate", "2e-2",
        "--disable_tqdm", "true"]  # fmt: skip


def _run_recipe(checkpoint: Path, output: Path, *extra: str) -> dict:
    args = ["--config", str(CONFIGS / "phase5_tiny.yaml"), "--model_name_or_path", str(checkpoint),
            "--output_dir", str(output), *FAST, *extra]  # fmt: skip
    (config,) = make_parser().parse_args_and_config(args=args)
    return main(config)


@needs_bwrap
def test_phase5_recipe_writes_a_loadable_packed_folder(phase4_checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "phase5"
    seen, real_pool = [], curriculum_trainer.pool_examples

    def spy(family, level, size, seed, sampling="random"):
        seen.append(sampling)
        return real_pool(family, level, size, seed, sampling)

    monkeypatch.setattr(curriculum_trainer, "pool_examples", spy)
    summary = _run_recipe(phase4_checkpoint, output)
    assert seen == ["stratified"]  # the YAML's pool_sampling reaches the level's pool
    report = json.loads((output / "curriculum_report.json").read_text())
    assert report == json.loads(json.dumps(summary["report"]))
    assert report["ternary"] and report["levels"] == [report["placement"]["start_level"]]
    record = report["records"][0]
    assert record["pool"]["initial"] == 3 and len(record["rounds"]) == 1
    assert set(record["bakes"]) == {"eudaimonia", "ooda", "identity"}
    assert record["self_model"]["bands"] == 2 and len(record["self_model"]["accuracy_after"]) == 2
    dreams = record["dreams"]  # the YAML's verified dreams: every sample ran in the sandbox, passing ones are kept
    assert (dreams["filter"], dreams["generated"]) == ("verified", 2 * 4)  # 2 tasks x dream_samples_per_task
    assert dreams["kept"] <= dreams["passed"] <= dreams["programs"] <= dreams["generated"]  # empty ones never run
    assert dreams["real"] == (0 if dreams["skipped"] else max(1, dreams["kept"]))
    loop, dreamed = record["rounds"][0]["programs"], dreams["programs"]
    assert report["totals"]["programs_run"] == 2 * 2 + loop + dreamed  # placement + loop + dreams

    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert model.config.bitnet["format"] == "packed"
    assert all(m.packed for m in model.modules() if isinstance(m, BitLinear))
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert (output / "model.safetensors").stat().st_size < 1.2 * (
        phase4_checkpoint / "model.safetensors"
    ).stat().st_size
    before, after = (load_file(folder / "model.safetensors") for folder in (phase4_checkpoint, output))
    packed = [key for key in before if key.endswith("weight_packed")]
    assert packed and any(not torch.equal(before[key], after[key]) for key in packed)  # STE moved ternary values

    lineage = json.loads((output / "forge_lineage.json").read_text())
    assert (lineage["phase"], lineage["phase_name"]) == (5, "curriculum")
    assert lineage["inputs"][0]["sha256"] == weights_sha256(phase4_checkpoint)
    assert lineage["parents"][0]["phase"] == 4
    card = (output / "README.md").read_text()
    assert "Placement" in card and f"start level {report['placement']['start_level']}" in card
    assert f"{dreams['generated']} dreams at temperature {dreams['temperature']}" in card
    assert f"{dreams['heldout_nll_after']:.3f}" in card if not dreams["skipped"] else "no dream was kept" in card
    assert all((output / "plots" / name).exists() for name in ("pool_size.png", "success_per_level.png",
                                                               "self_model_accuracy.png"))  # fmt: skip
    assert not (output.parent / ".phase5-work").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run_recipe(phase4_checkpoint, output)


@needs_bwrap
def test_a_sandbox_wide_failure_stops_the_phase_with_a_clear_error(phase4_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    sandbox._bwrap_problem.cache_clear()
    try:
        with pytest.raises(SandboxFailedError, match="bubblewrap.*Fix"):
            _run_recipe(phase4_checkpoint, tmp_path / "phase5")
    finally:
        sandbox._bwrap_problem.cache_clear()
    assert not (tmp_path / "phase5").exists()


@pytest.mark.slow
@needs_bwrap
def test_resume_continues_after_the_last_finished_level(phase4_checkpoint, tmp_path, monkeypatch):
    output = tmp_path / "phase5"
    levels = ["--num_levels", "2", "--placement_target", "0.99", "--bake", '{"steps": 0}', "--dreams", "false"]
    real_self_model = curriculum_trainer.self_model

    def crash_on_second_level(model, tokenizer, policy, prompts, level, *args, **kwargs):
        if level == 2:
            raise RuntimeError("simulated crash")
        return real_self_model(model, tokenizer, policy, prompts, level, *args, **kwargs)

    monkeypatch.setattr(curriculum_trainer, "self_model", crash_on_second_level)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_recipe(phase4_checkpoint, output, *levels)
    saved = json.loads((tmp_path / ".phase5-work" / "level-1" / "curriculum_state.json").read_text())
    assert [r["level"] for r in saved["records"]] == [1] and not output.exists()
    monkeypatch.setattr(curriculum_trainer, "self_model", real_self_model)
    summary = _run_recipe(phase4_checkpoint, output, *levels, "--resume", "true")
    report = summary["report"]
    assert [r["level"] for r in report["records"]] == [1, 2]
    assert report["records"][0]["rounds"] == saved["records"][0]["rounds"]  # level 1 was not run again
    assert report["placement"] == saved["placement"]
    assert report["backward_transfer"]["bwt"] is not None
