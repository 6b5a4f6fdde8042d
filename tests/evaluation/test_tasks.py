"""The built-in task families: determinism, split disjointness, exact scoring, difficulty, distance, code + sandbox."""

import ast
import operator
import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.tasks import (
    SPLITS,
    TASK_FAMILIES,
    ArithmeticFamily,
    CodeFamily,
    KVRecallFamily,
    VariableChainFamily,
    get_task_family,
    split_for_key,
)
from evaluation.tasks.code import TEMPLATES, truncate_completion
from evaluation.tasks.variable_chain import resolve

FAMILIES = sorted(TASK_FAMILIES)
GARBAGE = ["", " ", "\n\n", "garbage", "####", "#### ", "#### twelve", "####\n12", "🙂" * 5, "\x00\x01", "None"]


def _wrong_number(answer: str) -> str:
    return str(int(answer) + 1)


# -- registry -----------------------------------------------------------------------------------------------------


def test_registry_has_the_four_families_and_rejects_unknown_names():
    assert set(TASK_FAMILIES) == {"arithmetic", "kv_recall", "code", "variable_chain"}
    assert isinstance(get_task_family("arithmetic"), ArithmeticFamily)
    with pytest.raises(ValueError, match="arithmetic.*code.*kv_recall"):
        get_task_family("chess")


def test_options_build_a_new_instance_without_touching_the_registered_one():
    family = get_task_family("kv_recall", distance_words=40)
    assert isinstance(family, KVRecallFamily) and family is not TASK_FAMILIES["kv_recall"]
    assert family.generate("train", 1)[0].meta["distance_words"] == 40
    assert TASK_FAMILIES["kv_recall"].distance_words is None


# -- generation: determinism, splits, arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_is_deterministic_per_arguments_and_prefix_stable(name):
    family = TASK_FAMILIES[name]
    first = family.generate("train", 12, seed=3, difficulty=4)
    assert first == family.generate("train", 12, seed=3, difficulty=4)
    assert first[:5] == family.generate("train", 5, seed=3, difficulty=4)
    assert [e.key for e in first] != [e.key for e in family.generate("train", 12, seed=4, difficulty=4)]
    assert [e.key for e in first] != [e.key for e in family.generate("train", 12, seed=3, difficulty=5)]
    assert len({e.key for e in first}) == 12, "examples within one call must be distinct"
    assert all(e.family == name and e.meta["difficulty"] == 4 and e.meta["split"] == "train" for e in first)


@pytest.mark.parametrize(
    ("name", "difficulties", "per_split"),
    [
        ("arithmetic", (2, 6, 10), 700),
        ("kv_recall", (1, 3), 1000),
        ("code", (1, 3, 5, 7, 9), 200),
        ("variable_chain", (1, 4), 500),
    ],
)
def test_splits_never_overlap(name, difficulties, per_split):
    family = TASK_FAMILIES[name]
    keys = {split: set() for split in SPLITS}
    prompts = {split: set() for split in SPLITS}
    for split in SPLITS:
        for seed, difficulty in enumerate(difficulties):
            n = per_split * (4 if split == "train" else 1)
            for example in family.generate(split, n, seed=seed, difficulty=difficulty):
                assert split_for_key(name, example.key) == split
                keys[split].add(example.key)
                prompts[split].add(example.prompt)
    assert min(len(k) for k in keys.values()) >= per_split * len(difficulties) * 0.9
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not keys[a] & keys[b], f"{name}: {a} and {b} share problems"
        assert not prompts[a] & prompts[b]


def test_split_assignment_is_a_stable_content_hash():
    # Pinned values: a salted hash() or a changed hashing scheme would silently reshuffle every split (and leak
    # yesterday's test problems into today's training data).
    assert [split_for_key("arithmetic", f"k{i}") for i in range(10)] == [
        "train", "test", "train", "train", "train", "validation", "train", "train", "test", "test"
    ]  # fmt: skip
    shares = [split_for_key("code", f"key-{i}") for i in range(5000)]
    assert 0.77 < shares.count("train") / 5000 < 0.83
    assert 0.08 < shares.count("validation") / 5000 < 0.12


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_arguments_fail_with_a_clear_error(name):
    family = TASK_FAMILIES[name]
    with pytest.raises(ValueError, match="split"):
        family.generate("dev", 1)
    with pytest.raises(ValueError, match="difficulty"):
        family.generate("train", 1, difficulty=11)
    with pytest.raises(ValueError, match="difficulty"):
        family.generate("train", 1, difficulty=0)
    assert family.generate("train", 0) == []


def test_exhausted_problem_space_raises_instead_of_looping():
    with pytest.raises(ValueError, match="too small"):
        ArithmeticFamily().generate("validation", 5000, difficulty=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_training_text_is_prompt_plus_target(name):
    family = TASK_FAMILIES[name]
    for example in family.generate("train", 5, difficulty=3):
        assert family.training_text(example) == example.prompt + example.target
        assert example.prompt and example.target.strip() and example.answer


# -- scoring ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["arithmetic", "kv_recall", "variable_chain"])
def test_exact_scorers(name):
    family = TASK_FAMILIES[name]
    examples = family.generate("test", 20, seed=1, difficulty=5)
    for example in examples:
        assert family.score(example, example.target) == 1.0
        assert family.extract_answer(example.target) == example.answer
        wrong = example.target.replace(example.answer, _wrong_number(example.answer))
        assert family.score(example, wrong) == 0.0
        for garbage in GARBAGE:
            assert family.score(example, garbage) == 0.0
    assert family.score_batch(examples, [e.target for e in examples]) == [1.0] * len(examples)
    with pytest.raises(ValueError, match="completions"):
        family.score_batch(examples, [])


def test_arithmetic_answer_extraction_tolerates_formatting_but_not_junk():
    family = ArithmeticFamily()
    assert family.extract_answer("3 * 4 = 12\n#### 12") == "12"
    assert family.extract_answer("#### 12.") == "12"
    assert family.extract_answer("####  12  \n") == "12"
    assert family.extract_answer("#### 1,234") == "1234"
    assert family.extract_answer("#### $40") == "40"
    assert family.extract_answer("#### 12.0") == "12"
    assert family.extract_answer("#### -7\nQuestion: next one #### 3") == "-7"
    for malformed in ["12", "#### 12 apples", "#### 1 2", "#### .", "#### 12..5", "answer: 12"]:
        assert family.extract_answer(malformed) is None, malformed


def test_kv_answer_extraction_skips_digits_inside_keys():
    family = KVRecallFamily()
    assert family.extract_answer(" 4821") == "4821"
    assert family.extract_answer(" kav-17: 4821.") == "4821"
    assert family.extract_answer("The value is 93") == "93"
    assert family.extract_answer("kav-mol") is None


@settings(max_examples=150, deadline=None)
@given(completion=st.text(max_size=200))
def test_scorers_never_raise_on_arbitrary_text(completion):
    for family in (ArithmeticFamily(), KVRecallFamily(), VariableChainFamily()):
        example = family.generate("train", 1, difficulty=2)[0]
        assert family.score(example, completion) in (0.0, 1.0)
        assert family.score(example, "#### " + completion) in (0.0, 1.0)
    assert CodeFamily().extract_answer(completion) in (None, truncate_completion(completion))


# -- arithmetic -------------------------------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expression: str) -> float:
    """A tiny arithmetic evaluator (numbers and + - * / only) to check the worked steps."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def test_arithmetic_steps_are_correct_structured_and_match_the_target():
    family = ArithmeticFamily()
    for difficulty in range(1, 11):
        for example in family.generate("train", 30, seed=difficulty, difficulty=difficulty):
            steps = example.meta["steps"]
            lines = example.target.strip().split("\n")
            assert lines[-1] == f"#### {example.answer}"
            assert lines[:-1] == [step["text"] for step in steps]
            for step in steps:
                assert _evaluate(step["expression"]) == step["result"] >= 0
                assert step["text"].endswith(f"{step['expression']} = {step['result']}")
            assert str(steps[-1]["result"]) == example.answer
            assert example.prompt.startswith("Question: ") and example.prompt.endswith("\nAnswer:")


def test_arithmetic_difficulty_adds_steps_and_larger_numbers():
    family = ArithmeticFamily()

    def stats(difficulty):
        examples = family.generate("train", 200, seed=0, difficulty=difficulty)
        mean_steps = sum(e.meta["num_steps"] for e in examples) / len(examples)
        biggest = max(int(n) for e in examples for n in re.findall(r"\d+", e.prompt))
        ops = {op["op"] for e in examples for op in e.meta["operations"]}
        return mean_steps, biggest, ops

    (s1, n1, ops1), (s5, n5, ops5), (s10, n10, ops10) = stats(1), stats(5), stats(10)
    assert s1 == 1.0 and s1 < s5 < s10
    assert n1 <= 20 < n5 < n10
    assert ops1 == {"add", "sub"} and {"mul", "div", "group_add"} <= ops5 and "pct_sub" in ops10


# -- kv_recall --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("distance", "pairs"), [(0, 4), (1, 3), (7, 6), (64, 2), (300, 12), (2000, 5)])
def test_kv_distance_is_honoured_exactly_and_filler_never_holds_the_answer(distance, pairs):
    family = KVRecallFamily(distance_words=distance, num_pairs=pairs)
    for example in family.generate("train", 10, seed=distance, difficulty=5):
        meta, prompt = example.meta, example.prompt
        start, end = meta["value_char_span"]
        question = meta["question_char_start"]
        assert prompt[start:end] == example.answer
        assert prompt[question:].startswith(f"Question: What is the value of {meta['query_key']}?")
        assert len(prompt[end:question].split()) == distance == meta["distance_words"]
        assert meta["num_pairs"] == pairs and len(meta["pairs"]) == pairs
        assert meta["pairs"][meta["query_index"]] == [meta["query_key"], example.answer]
        assert len(re.findall(rf"(?<![\w-]){example.answer}(?![\w-])", prompt)) == 1
        assert meta["filler_words"] == distance - 2 * (pairs - 1 - meta["query_index"])


def test_kv_filler_has_no_digits_or_keys():
    family = KVRecallFamily(distance_words=500, num_pairs=1)
    for example in family.generate("validation", 20):
        filler = example.prompt[example.meta["value_char_span"][1] : example.meta["question_char_start"]]
        assert len(filler.split()) == 500
        assert not re.search(r"[\d-]", filler), "filler must never contain a value or a key"


def test_kv_difficulty_grows_pairs_distance_and_digits():
    family = KVRecallFamily()
    low, high = family.generate("train", 20, difficulty=1), family.generate("train", 20, difficulty=10)
    assert max(e.meta["num_pairs"] for e in low) < min(e.meta["num_pairs"] for e in high)
    assert max(e.meta["distance_words"] for e in low) < min(e.meta["distance_words"] for e in high)
    assert max(len(e.answer) for e in low) < min(len(e.answer) for e in high)


# -- variable_chain ---------------------------------------------------------------------------------------------------


def _assignments(example):
    return [line.split("=") for line in example.prompt.split("\n")[:-1]]


@pytest.mark.parametrize("difficulty", [1, 3, 10])
def test_chain_answer_is_what_following_the_assignments_gives(difficulty):
    for example in VariableChainFamily().generate("test", 30, seed=2, difficulty=difficulty):
        pairs = _assignments(example)
        assert example.prompt.endswith(f"\n{example.meta['query']}=") and example.target == example.answer
        assert resolve(example.prompt) == example.answer
        assert len(pairs) == 2 * difficulty == 2 * (example.meta["links"] + 1) == 2 * example.meta["lookups"]
        names = [name for name, _ in pairs]
        assert len(set(names)) == len(names), "every variable is assigned once"
        digits = [value for _, value in pairs if value.isdigit()]
        assert len(digits) == 2 and digits[0] != digits[1], "one distinct digit per chain"
        # The query sits `difficulty - 1` assignments above its digit: count the lookups.
        value, lookups, table = example.meta["query"], 1, dict(pairs)
        while not table[value].isdigit():
            value, lookups = table[value], lookups + 1
        assert lookups == difficulty


def test_chain_resolver_and_scorer_catch_a_wrong_answer():
    family = VariableChainFamily()
    example = family.generate("train", 1, seed=0, difficulty=3)[0]
    pairs = _assignments(example)
    other = next(value for _, value in pairs if value.isdigit() and value != example.answer)
    assert family.score(example, other) == 0.0, "the other chain's digit is wrong"
    assert family.score(example, f"{example.answer}\nq=") == 1.0
    # The resolver reads the prompt, not the metadata: point the query at the other chain's end and it follows.
    ends = {name for name, _ in pairs} - {value for _, value in pairs} - {example.meta["query"]}
    lines = example.prompt.split("\n")
    assert resolve("\n".join([*lines[:-1], f"{ends.pop()}="])) == other


def test_chain_has_no_positional_shortcut():
    examples = VariableChainFamily().generate("train", 200, seed=0, difficulty=3)
    assert 0.35 < sum(e.meta["query_chain"] for e in examples) / 200 < 0.65, "the query picks either chain"
    first_is_digit = sum(_assignments(e)[0][1].isdigit() for e in examples) / 200
    assert 0.15 < first_is_digit < 0.5, "lines are shuffled, not listed digit first"
    positions = {[name for name, _ in _assignments(e)].index(e.meta["query"]) for e in examples}
    assert positions == set(range(6)), "the queried variable's line can be anywhere"


def test_chain_options_fail_clearly():
    with pytest.raises(ValueError, match="num_chains"):
        VariableChainFamily(num_chains=11)
    with pytest.raises(ValueError, match="letters.*Fix"):
        VariableChainFamily(num_chains=3).generate("train", 1, difficulty=9)
    family = get_task_family("variable_chain", num_chains=3)
    assert len(family.generate("train", 1, difficulty=8)[0].prompt.split("\n")) == 3 * 8 + 1


# -- code: structure, variants, hints (no sandbox needed) -------------------------------------------------------------


def test_code_examples_are_humaneval_style():
    family = CodeFamily()
    for difficulty in range(1, 11):
        for example in family.generate("train", 8, seed=difficulty, difficulty=difficulty):
            meta = example.meta
            entry = meta["entry_point"]
            assert example.prompt.startswith(f"def {entry}(") and example.prompt.endswith('    """\n')
            assert meta["solution"] == example.prompt + example.target
            assert example.target.startswith("    ") and example.target.endswith("\n")
            assert meta["tests"] and all(t.startswith(f"assert {entry}(") for t in meta["tests"])
            assert TEMPLATES[meta["template"]].level in {difficulty, max(1, difficulty - 1)}
            ast.parse(meta["solution"] + "\n".join(meta["tests"]))


def test_code_difficulty_raises_the_template_level():
    family = CodeFamily()
    mean_level = {
        d: sum(e.meta["level"] for e in family.generate("train", 60, difficulty=d)) / 60 for d in (1, 4, 7, 10)
    }
    assert mean_level[1] == 1 and mean_level[1] < mean_level[4] < mean_level[7] < mean_level[10]


def test_code_extract_answer_cuts_at_stop_sequences():
    family = CodeFamily()
    assert family.extract_answer("    return x + 1\n\ndef other():\n    pass") == "    return x + 1\n"
    assert family.extract_answer("    return 1\nprint(f(2))") == "    return 1"
    assert family.extract_answer("") is None and family.extract_answer("  \n") is None
    assert family.program(family.generate("train", 1)[0], "\n\n") is None


@pytest.mark.parametrize("split", ["train", "test"])
def test_code_variants_keep_template_and_split_but_change_constants(split):
    family = CodeFamily()
    for example in family.generate(split, 25, seed=2, difficulty=6):
        variant = family.make_variant(example, seed=1)
        assert variant.meta["template"] == example.meta["template"]
        assert variant.meta["split"] == split == split_for_key("code", variant.key)
        assert variant.key != example.key and variant.meta["params"] != example.meta["params"]
        assert variant.prompt != example.prompt
        assert variant.meta["entry_point"] != example.meta["entry_point"]
        assert family.make_variant(example, seed=1) == variant
        assert family.make_variant(example, seed=2).key != example.key


def test_hint_names_the_failing_input_expected_value_and_step():
    family = CodeFamily()
    example = family.generate("train", 1, seed=5, difficulty=2)[0]
    case = example.meta["test_cases"][1]
    failed = SimpleNamespace(
        status="failed", tests_failed=[1], tests_passed=[0], failed_test=example.meta["tests"][1], stderr=""
    )
    hint = family.hint(example, failed)
    assert case["call"] in hint and case["expected"] in hint and example.meta["step"] in hint

    # Only the failing snippet known (no index): the call and expected value are parsed from it.
    parsed = family.hint(example, SimpleNamespace(status="failed", failed_test="assert f(3) == 10", stderr=""))
    assert "f(3)" in parsed and "10" in parsed

    crashed = SimpleNamespace(
        status="error", tests_failed=[0], failed_test=example.meta["tests"][0], stderr="...\nZeroDivisionError: boom"
    )
    assert "ZeroDivisionError: boom" in family.hint(example, crashed)
    assert "loop" in family.hint(example, SimpleNamespace(status="timeout", stderr=""))


# -- code: the sandbox ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox():
    from evaluation import sandbox

    return sandbox


def _spread_of_examples(n_per_difficulty: int = 2):
    family = CodeFamily()
    examples = []
    for difficulty in range(1, 11):
        examples += family.generate("test", n_per_difficulty, seed=11, difficulty=difficulty)
    return family, examples


def test_reference_passes(sandbox):
    family, examples = _spread_of_examples()
    assert len({e.meta["template"] for e in examples}) >= 10
    results = sandbox.run_many([(e.meta["solution"], e.meta["tests"]) for e in examples])
    failures = [
        (e.meta["template"], r.status, r.stderr[-300:]) for e, r in zip(examples, results, strict=True) if not r.passed
    ]
    assert not failures
    assert family.score_batch(examples, [e.target for e in examples]) == [1.0] * len(examples)


def test_corrupted_or_garbage_completions_fail(sandbox):
    _, examples = _spread_of_examples(1)
    family = CodeFamily(timeout_s=1.0)
    wrong = ["    return None\n"] * len(examples)
    assert family.score_batch(examples, wrong) == [0.0] * len(examples)
    garbage = ["", "lorem ipsum", "    return (", "    while True:\n        pass\n"]
    assert family.score_batch(examples[:4], garbage) == [0.0] * 4


def test_hint_from_a_real_failed_run_mentions_the_input(sandbox):
    family = CodeFamily(timeout_s=5.0)
    example = family.generate("train", 1, seed=0, difficulty=1)[0]
    completion = example.target.replace("return x", "return 1000 + x").replace("return a", "return 1000 + a")
    assert completion != example.target
    (result,) = family.run([example], [completion])
    assert result is not None and not result.passed
    hint = family.hint(example, result, completion)
    first_failed = example.meta["test_cases"][result.tests_failed[0] if result.tests_failed else 0]
    assert first_failed["call"] in hint and first_failed["expected"] in hint
    assert "returned" in hint
