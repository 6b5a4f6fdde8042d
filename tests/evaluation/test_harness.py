"""The evaluation harness: generation + extraction + scoring, log-likelihood multiple choice, sandbox pass@k, Hub
benchmarks offline and from local files, the local `evaluate` modules, composites and results in a model folder."""

import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

from evaluation.benchmarks import (
    EVAL_TASKS,
    PHASE6_SUITE,
    BenchmarkUnavailableError,
    EvalDoc,
    EvalTask,
    examples_task,
    extract_math_answer,
    get_eval_task,
)
from evaluation.evaluate_metrics import metric_path
from evaluation.harness import (
    composite_score,
    encode_pair,
    evaluate_model,
    evaluate_task,
    generate_completions,
    loglikelihoods,
    score_completions,
    write_eval_results,
)
from evaluation.metrics import pass_at_k
from evaluation.sandbox import STATUSES
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS, build_tokenizer


class CannedModel(torch.nn.Module):
    """A stand-in for a causal LM whose `generate` appends fixed completions, looked up by the decoded prompt.

    A list of completions for a prompt is cycled through the `num_return_sequences` samples.
    """

    device = torch.device("cpu")

    def __init__(self, tokenizer, completions):
        super().__init__()
        self.tokenizer, self.completions = tokenizer, completions
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.batches = []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, num_return_sequences=1, **kwargs):
        self.batches.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            assert mask[-1] == 1  # left padding: every prompt ends at the last column
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            answers = self.completions[prompt]
            answers = [answers] if isinstance(answers, str) else answers
            for i in range(num_return_sequences):
                new = self.tokenizer.encode(answers[i % len(answers)], add_special_tokens=False)[:max_new_tokens]
                rows.append(torch.cat([ids, torch.tensor(new + [self.tokenizer.eos_token_id], dtype=torch.long)]))
        width = max(len(row) for row in rows)
        return torch.stack([torch.nn.functional.pad(row, (0, width - len(row)), value=pad_token_id) for row in rows])


class UnigramModel(torch.nn.Module):
    """A causal LM that ignores its context: the same next-token log-probabilities at every position."""

    device = torch.device("cpu")

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = log_probs
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, -1).clone())


def _forge(tokenizer, seed=0, **overrides):
    config = ForgeConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    return ForgeForCausalLM(config).eval()


def _arc_rows():
    questions = [
        ("Which gas do plants take in from the air?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
        ("What is the boiling point of water at sea level?", ["100 C", "50 C", "0 C", "10 C"], "A"),
        ("Which planet is closest to the Sun?", ["Mars", "Venus", "Earth", "Mercury"], "D"),
        ("What do bees make?", ["milk", "silk", "honey", "wool"], "C"),
        ("Which of these is a mammal?", ["whale", "shark", "trout", "eel"], "A"),
        ("What force pulls objects toward the Earth?", ["magnetism", "gravity", "friction", "light"], "B"),
    ]
    return [
        {"id": f"q{i}", "question": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": k}
        for i, (q, c, k) in enumerate(questions)
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Generation, extraction and scoring.


def test_canned_completions_are_cut_extracted_and_scored(tiny_tokenizer):
    task = get_eval_task("arithmetic", difficulty=2)
    docs = task.docs(limit=5, seed=3)
    example = docs[0].meta["example"]
    completions = {
        docs[0].prompt: example.target + "\n\nQuestion: a new story with\n#### 999999",  # right, then cut at "\n\n"
        docs[1].prompt: docs[1].meta["example"].target,  # right
        docs[2].prompt: f"\nI think\n#### {int(docs[2].answer) + 1}",  # wrong number
        docs[3].prompt: "no answer line at all",  # nothing to extract
        docs[4].prompt: f" so\n#### {int(docs[4].answer):,}.0",  # right after normalisation (commas, .0)
    }
    model = CannedModel(tiny_tokenizer, completions)
    result = evaluate_task(model, tiny_tokenizer, task, limit=5, seed=3, batch_size=2, log_samples=True)
    assert model.batches == [2, 2, 1]
    assert result["n"] == 5 and result["primary_metric"] == "exact_match"
    assert result["score"] == pytest.approx(3 / 5)
    samples = result["samples"]
    assert samples[0]["completions"] == [example.target]  # the stop sequence "\n\n" cut the rest
    assert [s["correct"] for s in samples] == [[True], [True], [False], [False], [True]]
    assert samples[3]["extracted"] == [None]
    assert samples[4]["extracted"] == [docs[4].answer]


def test_batched_left_padded_generation_equals_one_by_one(tiny_tokenizer):
    # A wide init so an untrained model's greedy stream depends on its context.
    model = _forge(tiny_tokenizer, initializer_range=0.3)
    prompts = ["To be", "ROMEO. What light through yonder window breaks? It is the east", "Now is the winter", "O"]
    kwargs = {"max_new_tokens": 24, "stop_sequences": ()}
    batched = generate_completions(model, tiny_tokenizer, prompts, batch_size=4, **kwargs)
    alone = [generate_completions(model, tiny_tokenizer, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == alone
    assert len({c[0] for c in batched}) == len(prompts)  # completions differ: the prompts mattered
    # Sampling: seeded, reproducible, and not the greedy stream.
    sampled = generate_completions(model, tiny_tokenizer, prompts[:2], num_samples=3, temperature=1.0, **kwargs)
    again = generate_completions(model, tiny_tokenizer, prompts[:2], num_samples=3, temperature=1.0, **kwargs)
    assert sampled == again and all(len(s) == 3 for s in sampled)
    assert sampled[0] != batched[0] * 3
    with pytest.raises(ValueError, match="temperature"):
        generate_completions(model, tiny_tokenizer, prompts, num_samples=2)


def test_real_tiny_forge_end_to_end_on_builtin_tasks(tiny_tokenizer):
    model = _forge(tiny_tokenizer)
    model.train()
    names = ["arithmetic", "kv_recall", "variable_chain", "code"]
    results = evaluate_model(model, tiny_tokenizer, names, limit=3, log_samples=True)
    assert model.training  # restored
    assert list(results) == names
    for name, result in results.items():
        assert result["n"] == 3 and result["backend"] == "agent-forge" and result["source"] == "built-in"
        assert result["seconds"] > 0 and result["dataset"] == f"agent-forge/{name}"
        # The score is exactly the share of documents whose completion the task's own scorer accepts, recomputed
        # here from the logged completions (a harness that scored 0, 1 or anything else would fail).
        task = get_eval_task(name)
        if task.mode == "exact_match":
            verdicts = [task.extract_answer(s["completions"][0]) == s["answer"] for s in result["samples"]]
            assert [s["correct"][0] for s in result["samples"]] == verdicts
        else:
            verdicts = [s["status"][0] == "passed" for s in result["samples"]]
            assert all(status in (*STATUSES, "empty") for s in result["samples"] for status in s["status"])
        assert result["score"] == pytest.approx(sum(verdicts) / 3)
    arithmetic = results["arithmetic"]
    assert arithmetic["metrics"]["exact_match"] == pytest.approx(
        sum(s["correct"][0] for s in arithmetic["samples"]) / 3
    )
    assert all(isinstance(s["completions"][0], str) for s in arithmetic["samples"])
    assert all(len(s["status"]) == 1 for s in results["code"]["samples"])


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood.


def test_loglikelihood_scoring_and_length_normalisation_on_constructed_model():
    # Bytes and special tokens only, no merges: one token per character.
    tokenizer = build_tokenizer(["abc xyz"], vocab_size=BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS))
    probs = torch.full((len(tokenizer),), 1e-9)
    for char, p in ((" ", 0.5), ("x", 0.1), ("y", 0.4)):
        (token,) = tokenizer.encode(char, add_special_tokens=False)
        probs[token] = p
    model = UnigramModel(torch.log(probs / probs.sum()))
    doc = EvalDoc(id="0", prompt="Q:", choices=("x", "yyyyyyyy"), gold=1)
    requests = [(doc.prompt, " " + choice) for choice in doc.choices]
    (ll_x, greedy_x), (ll_y, greedy_y) = loglikelihoods(model, tokenizer, requests)
    assert ll_x == pytest.approx(math.log(0.5) + math.log(0.1), abs=1e-5)  # -2.996
    assert ll_y == pytest.approx(math.log(0.5) + 8 * math.log(0.4), abs=1e-5)  # -8.023
    assert not greedy_x and not greedy_y  # " " is the argmax everywhere
    task = EvalTask("constructed", "multiple_choice", lambda *_: [doc], "test", "none", "acc_norm")
    result = evaluate_task(model, tokenizer, task, log_samples=True)
    # Raw sums prefer the short "x"; per character (-2.996 vs -1.003) the long choice wins, which is gold.
    assert result["samples"][0]["pred"] == 0 and result["samples"][0]["pred_norm"] == 1
    assert result["metrics"] == {"acc": 0.0, "acc_norm": 1.0}


def test_fine_tuned_tiny_forge_picks_the_answer_it_learned(tiny_tokenizer):
    model = _forge(tiny_tokenizer)
    prompt = "Question: Who wrote the play about the Prince of Denmark?\nAnswer:"
    doc = EvalDoc(id="0", prompt=prompt, choices=("Rome", "a fisherman", "nobody at all", "Shakespeare"), gold=3)
    task = EvalTask("hamlet", "multiple_choice", lambda *_: [doc], "test", "none", "acc")
    before = evaluate_task(model, tiny_tokenizer, task, log_samples=True)["samples"][0]["loglikelihoods"]
    ids = torch.tensor([tiny_tokenizer(prompt + " Shakespeare")["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    result = evaluate_task(model, tiny_tokenizer, task, log_samples=True)
    after = result["samples"][0]["loglikelihoods"]
    assert after[3] > before[3] + 10  # training raised the learned answer's log-likelihood a lot
    assert result["metrics"] == {"acc": 1.0, "acc_norm": 1.0}


def test_batched_loglikelihoods_equal_one_by_one_and_a_direct_forward(tiny_tokenizer):
    model = _forge(tiny_tokenizer, initializer_range=0.3)
    requests = [
        ("Question: Which gas?\nAnswer:", " carbon dioxide"),
        ("To be, or not to be ", "that is the question"),  # trailing space moves to the continuation
        ("A", " b"),
        ("", "Hello there"),  # empty context: BOS is the context
    ]
    batched = loglikelihoods(model, tiny_tokenizer, requests, batch_size=4)
    alone = [loglikelihoods(model, tiny_tokenizer, [r], batch_size=1)[0] for r in requests]
    for (a, _), (b, _) in zip(batched, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    context, continuation = encode_pair(tiny_tokenizer, *requests[1])
    assert tiny_tokenizer.decode(continuation) == " that is the question"
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    direct = sum(float(log_probs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert batched[1][0] == pytest.approx(direct, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# pass@k through the sandbox.


def test_pass_at_k_through_the_sandbox_matches_hand_computed_values(tiny_tokenizer):
    task = get_eval_task("humaneval")
    first, second = task.docs(limit=2)
    right = first.answer  # the canonical body
    completions = {
        # 2 of 4 samples pass: one correct body, one wrong result, one syntax error, the correct body again.
        first.prompt: [right, "    return False\n", "    return (\n", right + "\ndef unused():\n    pass\n"],
        second.prompt: ["    return []\n", "    raise ValueError\n", "    while True:\n        pass\n", ""],
    }
    model = CannedModel(tiny_tokenizer, completions)
    result = evaluate_task(
        model, tiny_tokenizer, task, limit=2, num_samples=4, ks=(1, 2, 4), sandbox_limits={"timeout_s": 1.0},
        log_samples=True,
    )  # fmt: skip
    # Problem 1: n=4, c=2 -> pass@1 = 1/2, pass@2 = 1 - C(2,2)/C(4,2) = 5/6, pass@4 = 1. Problem 2: c=0 -> 0.
    assert result["metrics"]["pass@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert result["metrics"]["pass@2"] == pytest.approx((5 / 6 + 0) / 2)
    assert result["metrics"]["pass@4"] == pytest.approx((1 + 0) / 2)
    assert result["samples"][0]["passed"] == [True, False, False, True]
    assert result["samples"][1]["status"][2] == "timeout" and result["samples"][1]["status"][3] == "empty"
    # The built-in code family, on Phase 5-style given examples: a reference body passes, a wrong body fails.
    from evaluation.tasks import get_task_family

    family = get_task_family("code")
    (example,) = family.generate("train", 1, seed=1, difficulty=3)
    variant = family.make_variant(example, seed=0)
    code = examples_task([example, variant], name="level-3")
    docs = code.docs()
    assert code.mode == "pass_at_k" and [d.meta["example"] for d in docs] == [example, variant]
    completions = [[example.answer, "    return None\n"], ["    return None\n", "    return None\n"]]
    metrics, samples = score_completions(code, docs, completions, ks=(2,))
    assert samples[0]["passed"] == [True, False] and samples[1]["passed"] == [False, False]
    assert metrics == {"pass@1": 0.25, "pass@2": 0.5}


# ---------------------------------------------------------------------------------------------------------------
# Hub benchmarks offline, and from local files.


@pytest.mark.parametrize("name", ["gsm8k", "math", "arc-easy", "arc-challenge", "hellaswag", "mmlu"])
def test_offline_hub_benchmark_fails_fast_with_the_fix_in_the_message(name):
    # Imported before timing: the failure itself must be fast.
    import datasets  # noqa: F401

    import evaluation.data_sources  # noqa: F401

    task = get_eval_task(name)
    started = time.perf_counter()
    with pytest.raises(BenchmarkUnavailableError) as error:
        task.docs(limit=3)
    assert time.perf_counter() - started < 2.0
    message = str(error.value)
    assert name in message and "data_files" in message and "offline" in message


def test_unreachable_hub_without_offline_mode_fails_fast(monkeypatch):
    """Offline mode not set but no Hub: a quick connection probe answers instead of `datasets` retrying for ~23 s."""
    import datasets
    import huggingface_hub

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the network"))
    started = time.perf_counter()
    with pytest.raises(BenchmarkUnavailableError, match="not reachable"):
        get_eval_task("arc-challenge").docs(limit=2)
    assert time.perf_counter() - started < 2.0


def test_local_files_give_the_same_documents_as_the_hub_format(tmp_path, tiny_tokenizer):
    arc = get_eval_task("arc-easy").docs(data_files=str(_write_jsonl(tmp_path / "arc.jsonl", _arc_rows())))
    assert len(arc) == 6 and arc[0].prompt == "Question: Which gas do plants take in from the air?\nAnswer:"
    assert arc[0].choices == ("oxygen", "carbon dioxide", "helium", "neon") and arc[0].gold == 1
    gsm = [
        {"question": "Tom has 3 boxes of 400 pens. How many pens?", "answer": "3*400=<<3*400=1200>>1200\n#### 1,200"}
    ]
    (doc,) = get_eval_task("gsm8k").docs(data_files=_write_jsonl(tmp_path / "gsm.jsonl", gsm))
    assert doc.prompt == "Question: Tom has 3 boxes of 400 pens. How many pens?\nAnswer:" and doc.answer == "1200"
    assert get_eval_task("gsm8k").extract_answer("\n3 * 400 = 1200\n#### 1200") == "1200"
    swag = [{"ind": 4, "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
             "ctx": "A man mixes flour. he", "endings": ["bakes [title] bread.", "swims."], "label": "0"}]  # fmt: skip
    (doc,) = get_eval_task("hellaswag").docs(data_files=_write_jsonl(tmp_path / "swag.jsonl", swag))
    assert doc.prompt == "Baking: A man mixes flour. He" and doc.choices == ("bakes. bread.", "swims.")
    mmlu = [
        {"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}
    ]
    (doc,) = get_eval_task("mmlu").docs(data_files=_write_jsonl(tmp_path / "mmlu.jsonl", mmlu))
    assert doc.prompt.startswith("The following are multiple choice questions (with answers) about elementary math")
    assert doc.prompt.endswith("2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:") and doc.choices == tuple("ABCD")
    math_rows = [{"problem": "Simplify 2/4.", "solution": "It is $\\boxed{\\dfrac{1}{2}}$.", "answer": "\\frac{1}{2}"}]
    (doc,) = get_eval_task("math").docs(data_files=_write_jsonl(tmp_path / "math.jsonl", math_rows))
    assert doc.answer == "\\frac{1}{2}" and extract_math_answer("so \\boxed{\\dfrac{1}{2}}.") == doc.answer
    with pytest.raises(ValueError, match="lack the fields"):
        get_eval_task("arc-easy").docs(data_files=_write_jsonl(tmp_path / "bad.jsonl", [{"question": "x"}]))
    # The same benchmark end to end from the local file.
    result = evaluate_model(
        _forge(tiny_tokenizer), tiny_tokenizer, "arc-easy", limit=4, data_files={"arc-easy": tmp_path / "arc.jsonl"}
    )["arc-easy"]
    assert result["n"] == 4 and result["source"].startswith("local:") and result["split"] == "test"


# ---------------------------------------------------------------------------------------------------------------
# The local `evaluate` modules.


def test_local_evaluate_modules_load_offline_and_agree_with_the_harness(tmp_path, tiny_tokenizer):
    import evaluate

    data = _write_jsonl(tmp_path / "arc.jsonl", _arc_rows())
    result = evaluate_task(_forge(tiny_tokenizer, initializer_range=0.3), tiny_tokenizer, "arc-easy",
                           data_files=data, log_samples=True)  # fmt: skip
    accuracy = evaluate.load(metric_path("forge_accuracy"))
    golds = [s["gold"] for s in result["samples"]]
    preds = [s["pred"] for s in result["samples"]]
    assert accuracy.compute(predictions=preds, references=golds)["accuracy"] == result["metrics"]["acc"]
    norm = accuracy.compute(predictions=[s["pred_norm"] for s in result["samples"]], references=golds)
    assert norm["accuracy"] == result["metrics"]["acc_norm"]
    exact = evaluate.load(metric_path("forge_exact_match"))
    assert exact.compute(predictions=["12", "", " 7 "], references=["12", "3", "7"]) == {"exact_match": 2 / 3}
    verdicts = [[True, False, True, False, False], [False] * 5, [True] * 5]
    expected = {f"pass@{k}": float(pass_at_k([5, 5, 5], [2, 0, 5], k).mean()) for k in (1, 3)}
    assert evaluate.load(metric_path("forge_pass_at_k")).compute(predictions=verdicts, k=[1, 3]) == expected


# ---------------------------------------------------------------------------------------------------------------
# Registry, composite and results in the model folder.


def test_registry_errors_options_and_weighted_composite():
    with pytest.raises(ValueError, match="known tasks: .*arc-easy"):
        get_eval_task("arc_easy")
    with pytest.raises(ValueError, match="no options"):
        get_eval_task("mmlu", difficulty=3)
    hard = get_eval_task("kv_recall", difficulty=4, num_pairs=3)
    assert hard.options["difficulty"] == 4 and hard.options["family_options"] == {"num_pairs": 3}
    assert EVAL_TASKS["kv_recall"].options["difficulty"] == 1  # the registered task is unchanged
    assert hard.docs(limit=2)[0].prompt.count(": ") >= 3
    assert set(PHASE6_SUITE) <= set(EVAL_TASKS) and sum(PHASE6_SUITE.values()) == pytest.approx(1.0)
    results = {"a": {"score": 0.5}, "b": {"score": 1.0}, "c": {"score": 0.0}}
    assert composite_score(results, {"a": 0.2, "b": 0.6}) == pytest.approx((0.2 * 0.5 + 0.6 * 1.0) / 0.8)
    with pytest.raises(ValueError, match="No results for weighted tasks"):
        composite_score(results, {"a": 1.0, "mmlu": 1.0})


def test_write_eval_results_updates_metrics_json_and_the_card(tmp_path, tiny_tokenizer):
    from trainers.phase_output import save_phase_output

    model = _forge(tiny_tokenizer)
    folder = save_phase_output(tmp_path / "phase", model=model, tokenizer=tiny_tokenizer, phase=1,
                               phase_name="cognate", config={"x": 1}, metrics={"eval/perplexity": 41.5}, seed=0,
                               wall_time_s=1.0)  # fmt: skip
    results = evaluate_model(model, tiny_tokenizer, ["kv_recall"], limit=2)
    results["kv_recall"]["metrics"]["exact_match"] = results["kv_recall"]["score"] = 0.123456  # a recognisable value
    write_eval_results(folder, results)
    write_eval_results(folder, results)  # idempotent: entries replaced, not duplicated
    payload = json.loads((folder / "metrics.json").read_text())
    assert payload["metrics"] == {"eval/perplexity": 41.5}
    (entry,) = payload["eval_results"]
    assert entry["task"] == "kv_recall" and entry["metric"] == "exact_match" and entry["value"] == 0.123456
    card = (folder / "README.md").read_text()
    assert "model-index" in card and "0.123456" in card and "agent-forge/kv_recall" in card
    saved = json.loads((folder / "eval_results.json").read_text())["results"]
    assert saved["kv_recall"]["n"] == 2
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
