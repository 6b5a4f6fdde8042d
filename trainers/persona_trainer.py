"""Phase 6 (tool and persona baking): alternate A-cycles (tool-use prompts) and B-cycles (self-descriptions), keeping a
half-bake only when a paired evaluation shows it helps.

    from trainers.persona_config import PersonaConfig
    from trainers.persona_trainer import run_phase6

    summary = run_phase6(PersonaConfig(model_name_or_path="outputs/tiny/phase5", output_dir="outputs/tiny/phase6"))

- **A-cycle**: each prompt of `tool_prompts` is half-baked (`bake_prompt`, fraction 0.5) into a copy of the current
  model, with training-split code prompts as the inputs it precedes; each copy writes code for the fixed held-out
  code tasks (validation split; HumanEval too with `humaneval=True`), run with their tests in the sandbox.
- **B-cycle**: the model writes `num_self_descriptions` self-descriptions; a degenerate one (too short, repetitive,
  a near-copy of another, or of high perplexity under the model itself) is replaced from `persona_templates`; each
  is scored in context on the weighted suite (held-out items of the local task families, or Hub benchmarks given as
  files); the best is half-baked and the baked model is scored without it.
- **Keeping a bake**: a cycle's winner is compared with the current model on the *same* items (paired): the gain is
  the weighted mean per-item difference; a percentile bootstrap over items gives its confidence interval. The bake
  is kept when the gain is at least `min_gain` and the interval's lower bound is above zero. SPEC's "< 0.5% gain"
  rule is below the noise of a few dozen items (one item of 32 is 3 points), hence the interval (GEPA's
  no-improvement stopper and OPRO's keep-the-best loop are the anchors).
- **Stopping**: a kind (A or B) plateaus after `patience` cycles in a row without a kept bake; a kept bake of one
  kind re-opens the other (the model changed); the loop ends when both have plateaued or after `max_cycles`.

Selection uses validation-split items only; the pipeline's report evaluates on the test split, so Phase 6 is never
tuned on the items it is reported on. Outputs: the phase folder (weights, card, lineage), `ab_history.json` (every
candidate, score, gain, interval, decision and bake strength), `plots/ab_scores.png`, `plots/ab_gains.png`.
Hand-written here because no kept library has it: the A/B alternation, the paired bootstrap and the degeneracy checks
(a few lines of numpy); generation, scoring, the sandbox, baking and saving reuse the project's parts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.utils import logging

import modeling_forge  # noqa: F401  (registers the Forge model with the Auto classes)
from evaluation.benchmarks import EvalDoc, EvalTask, get_eval_task
from evaluation.harness import generate_completions, loglikelihoods, score_completions
from evaluation.tasks import get_task_family
from hub_cards.plots import line_plot

from .checkpointing import atomic_directory
from .persona_config import PersonaConfig
from .phase_output import save_phase_output
from .tracking import LoopTracker

logger = logging.get_logger(__name__)

HISTORY_FILE = "ab_history.json"
BUILTIN_FAMILIES = ("arithmetic", "kv_recall", "code")


# ----------------------------------------------------------------------------------------------------------------
# Paired evaluation


def paired_bootstrap(
    base: Sequence[float],
    candidate: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    samples: int = 2000,
    confidence: float = 0.9,
    seed: int = 0,
) -> dict[str, float]:
    """Weighted mean gain of `candidate` over `base` on the same items and its percentile bootstrap interval.

    Items are resampled with replacement; each resample's gain is the weighted mean of its paired differences
    (weights renormalised over the drawn items), so the interval reflects which items happened to be in the set.
    """
    base, candidate = np.asarray(base, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if base.shape != candidate.shape or base.ndim != 1 or base.size == 0:
        raise ValueError(
            f"paired_bootstrap needs two equal-length 1-D score vectors, got {base.shape}, {candidate.shape}"
        )
    w = np.ones_like(base) if weights is None else np.asarray(weights, dtype=np.float64)
    diff = candidate - base
    gain = float((w * diff).sum() / w.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(samples, diff.size))
    boot = (w[idx] * diff[idx]).sum(1) / np.maximum(w[idx].sum(1), 1e-12)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return {"gain": gain, "ci_low": float(low), "ci_high": float(high), "n": int(diff.size)}


def keep_decision(stats: dict[str, float], min_gain: float) -> bool:
    """Keep a bake when its gain clears `min_gain` and the interval's lower bound is above zero."""
    return stats["gain"] >= min_gain and stats["ci_low"] > 0.0


# ----------------------------------------------------------------------------------------------------------------
# Items and scoring


@dataclass(frozen=True)
class Item:
    """One fixed evaluation item: its task, document and weight in its cycle's score."""

    task: EvalTask
    doc: EvalDoc
    weight: float


class Scorer(Protocol):
    """What the A/B loop asks of a scorer: per-item scores (0-1) on the fixed items of a cycle kind.

    `prefix` is put before every task prompt (a persona in context); `baked` lists the prompts baked into `model`
    so far (a real scorer ignores it; a scripted test scorer uses it).
    """

    def score(self, kind: str, model, tokenizer, prefix: str = "", baked: Sequence[str] = ()) -> np.ndarray: ...

    def weights(self, kind: str) -> np.ndarray: ...


def _builtin_items(name: str, split: str, difficulty: int, n: int, seed: int) -> list[EvalDoc]:
    return get_eval_task(name, split=split, difficulty=difficulty).docs(limit=n, seed=seed)


class TaskScorer:
    """Scores a model on fixed held-out items: A = code tasks in the sandbox (+ HumanEval), B = the weighted suite."""

    def __init__(self, config: PersonaConfig, batch_size: int | None = None) -> None:
        self.config = config
        self.batch_size = batch_size or config.batch_size
        a_items: list[Item] = []
        for difficulty in config.code_difficulty:
            docs = _builtin_items("code", "validation", difficulty, config.code_examples, config.seed)
            a_items += [Item(get_eval_task("code", split="validation", difficulty=difficulty), d, 1.0) for d in docs]
        if config.humaneval:
            task = get_eval_task("humaneval")
            a_items += [Item(task, d, 1.0) for d in task.docs(limit=config.humaneval_limit)]
        b_items: list[Item] = []
        total = sum(config.suite.values())
        for name, weight in config.suite.items():
            if weight <= 0:
                continue
            if name in BUILTIN_FAMILIES:
                task = get_eval_task(name, split="validation", difficulty=config.suite_difficulty)
                docs = task.docs(limit=config.suite_examples, seed=config.seed)
            else:
                task = get_eval_task(name)
                docs = task.docs(limit=config.suite_examples, data_files=config.data_files.get(name), seed=config.seed)
            b_items += [Item(task, d, weight / total / len(docs)) for d in docs]
        self.items = {"A": a_items, "B": b_items}

    def weights(self, kind: str) -> np.ndarray:
        """Per-item weights of a cycle kind (B: task weight / items of that task; A: uniform)."""
        return np.asarray([item.weight for item in self.items[kind]], dtype=np.float64)

    def score(self, kind: str, model, tokenizer, prefix: str = "", baked: Sequence[str] = ()) -> np.ndarray:
        """Per-item 0/1 scores of `model` on the kind's items, `prefix` before each prompt (code: in the sandbox)."""
        items = self.items[kind]
        scores = np.zeros(len(items))
        by_task: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_task.setdefault(item.task.name + repr(sorted(item.task.options.items())), []).append(index)
        for indices in by_task.values():
            task = items[indices[0]].task
            docs = [dataclasses.replace(items[i].doc, prompt=prefix + items[i].doc.prompt) for i in indices]
            if task.mode == "multiple_choice":
                requests = [(d.prompt, task.target_delimiter + c) for d in docs for c in d.choices]
                lls = iter(loglikelihoods(model, tokenizer, requests, batch_size=self.batch_size))
                values = [float(np.argmax([next(lls)[0] for _ in d.choices]) == d.gold) for d in docs]
            else:
                limit = self.config.code_max_new_tokens if task.mode == "pass_at_k" else task.max_new_tokens
                completions = generate_completions(
                    model, tokenizer, [d.prompt for d in docs], max_new_tokens=limit, batch_size=self.batch_size,
                    stop_sequences=task.stop_sequences, seed=self.config.seed,
                )  # fmt: skip
                _, samples = score_completions(task, docs, completions)
                key = "correct" if task.mode == "exact_match" else "passed"
                values = [float(sample[key][0]) for sample in samples]
            scores[indices] = values
        return scores

    def bake_inputs(self, kind: str, n: int) -> list[str]:
        """Training-split task prompts a baked prompt precedes during a bake (never the scored items)."""
        names = ["code"] if kind == "A" else [name for name in self.config.suite if name in BUILTIN_FAMILIES]
        names = names or ["code"]
        difficulty = self.config.code_difficulty[0] if kind == "A" else self.config.suite_difficulty
        per = max(1, n // len(names))
        prompts = []
        for name in names:
            prompts += [e.prompt for e in get_task_family(name).generate("train", per, seed=self.config.seed,
                                                                          difficulty=difficulty)]  # fmt: skip
        return prompts


# ----------------------------------------------------------------------------------------------------------------
# Self-descriptions


@torch.no_grad()
def self_perplexity(model, tokenizer, text: str, context: str = "") -> float:
    """Perplexity of `text` under `model` after `context` (the model's own view of how likely its words are)."""
    ctx = tokenizer(context)["input_ids"] if context else tokenizer("")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        return math.inf
    full = torch.tensor([ctx + ids], device=model.device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=full).logits[0, len(ctx) - 1 : -1].float()
    finally:
        model.train(was_training)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids, device=model.device))
    return float(torch.exp(nll))


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", text.lower())


@functools.lru_cache(maxsize=1)
def _corpus_words() -> frozenset[str]:
    """Words of the built-in corpus (training split): what counts as a real word for the degeneracy check."""
    from evaluation.corpus import corpus_texts

    return frozenset(word for text in corpus_texts("train", max_chars=3_000_000) for word in _words(text))


def known_words(config: PersonaConfig) -> frozenset[str]:
    """Real words: the corpus's plus those of the prompt pools and the self-description prompt."""
    own = " ".join([*config.tool_prompts, *config.persona_templates, config.self_description_prompt])
    return _corpus_words() | frozenset(_words(own))


def degeneracy_reasons(
    text: str,
    earlier: Sequence[str],
    perplexity: float,
    config: PersonaConfig,
    vocabulary: frozenset[str] | None = None,
) -> list[str]:
    """Why a self-description is unusable as a persona prompt (empty list: usable). `vocabulary` (default:
    `known_words(config)`) holds the words that count as real for `min_known_words`."""
    reasons = []
    words = _words(text)
    if words and config.min_known_words > 0:
        vocabulary = known_words(config) if vocabulary is None else vocabulary
        share = sum(word in vocabulary for word in words) / len(words)
        if share < config.min_known_words:
            reasons.append(f"known words {share:.2f} < {config.min_known_words}")
    if len(words) < config.min_words:
        reasons.append(f"{len(words)} words < {config.min_words}")
    elif len(set(words)) / len(words) < config.min_distinct_ratio:
        reasons.append(f"distinct words {len(set(words)) / len(words):.2f} < {config.min_distinct_ratio}")
    for other in earlier:
        a, b = set(words), set(_words(other))
        if a and b and len(a & b) / len(a | b) > config.max_overlap:
            reasons.append(f"overlap {len(a & b) / len(a | b):.2f} > {config.max_overlap} with another candidate")
            break
    if not perplexity < config.max_self_perplexity:
        reasons.append(f"self-perplexity {perplexity:.1f} >= {config.max_self_perplexity}")
    return reasons


def write_self_descriptions(model, tokenizer, config: PersonaConfig, seed: int) -> list[dict[str, Any]]:
    """The model's self-descriptions, each checked; degenerate ones replaced from the template pool (round robin,
    skipping templates already used in this cycle)."""
    prompt = config.self_description_prompt
    texts = generate_completions(
        model, tokenizer, [prompt], num_samples=config.num_self_descriptions,
        temperature=config.self_description_temperature, max_new_tokens=config.self_description_max_new_tokens,
        stop_sequences=("\n\n",), seed=seed,
    )[0]  # fmt: skip
    candidates, used = [], []
    pool = list(config.persona_templates)
    for index, raw in enumerate(texts):
        text = ("I am" + raw).strip() if prompt.rstrip().endswith("I am") else raw.strip()
        ppl = self_perplexity(model, tokenizer, raw, prompt) if raw.strip() else math.inf
        reasons = degeneracy_reasons(text, [c["text"] for c in candidates], ppl, config)
        record = {"generated": text, "self_perplexity": ppl, "degenerate": reasons}
        if reasons:
            fresh = [t for t in pool if t not in used] or pool
            text = fresh[(seed + index) % len(fresh)]
            record["source"] = "template"
        else:
            record["source"] = "model"
        used.append(text)
        candidates.append({**record, "text": text})
    return candidates


# ----------------------------------------------------------------------------------------------------------------
# The A/B loop


@dataclass
class LoopState:
    """Everything the loop needs to resume: the history so far, plateau counters and the bake ledger."""

    cycles: list[dict] = dataclasses.field(default_factory=list)
    streak: dict[str, int] = dataclasses.field(default_factory=lambda: {"A": 0, "B": 0})
    baked: list[dict] = dataclasses.field(default_factory=list)
    input_scores: dict[str, float] | None = None
    stopped: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LoopState:
        return cls(**values)


BakeFn = Callable[[Any, Any, str, Sequence[str]], tuple[Any, dict]]


def default_bake(config: PersonaConfig) -> BakeFn:
    """Half-bake with `run_prompt_baking`: returns the merged model and the bake's measurements."""

    def bake(model, tokenizer, prompt: str, inputs: Sequence[str]) -> tuple[Any, dict]:
        from .baking_trainer import run_prompt_baking

        result = run_prompt_baking(model, tokenizer, prompt, config.bake_config(), inputs=list(inputs))
        return result.model, {
            "strength": result.strength, "nominal_strength": result.nominal_strength,
            "kl_before": result.kl_initial, "kl_after": result.kl_final,
        }  # fmt: skip

    return bake


def _ledger_strength(baked: Sequence[dict], prompt: str, fraction: float) -> float:
    """Nominal cumulative strength of `prompt` after its half-bakes so far: 1 - (1 - fraction)^count."""
    count = sum(1 for entry in baked if entry["prompt"] == prompt)
    return 1.0 - (1.0 - fraction) ** count


def run_ab_cycles(
    model,
    tokenizer,
    config: PersonaConfig,
    scorer: Scorer,
    *,
    bake: BakeFn | None = None,
    state: LoopState | None = None,
    on_cycle: Callable[[Any, LoopState], None] | None = None,
    current: dict[str, np.ndarray] | None = None,
) -> tuple[Any, LoopState]:
    """Alternate A- and B-cycles from `state` (a fresh one by default) until both plateau; returns the final model.

    `on_cycle(model, state)` runs after every finished cycle (the recipe checkpoints there, so a cut run resumes).
    """
    bake = bake or default_bake(config)
    state = state or LoopState()
    fraction = config.bake_config().fraction
    baked_prompts = [entry["prompt"] for entry in state.baked]
    if current is None:  # per-item scores of the current model (given by the caller when it has them)
        current = {kind: scorer.score(kind, model, tokenizer, baked=baked_prompts) for kind in ("A", "B")}
    order = ["A", "B"] if config.first_cycle == "A" else ["B", "A"]
    progress = tqdm(total=config.max_cycles, initial=len(state.cycles), desc="Phase 6 A/B cycles")
    while True:
        index = len(state.cycles)
        if all(state.streak[k] >= config.patience for k in ("A", "B")):
            state.stopped = "plateau"
            break
        if index >= config.max_cycles:
            state.stopped = "max_cycles"
            break
        kind = order[index % 2]
        started = time.time()
        cycle_seed = config.seed + 1000 * (index + 1)
        weights = scorer.weights(kind)
        base_mean = float(np.dot(weights, current[kind]) / weights.sum())
        record: dict[str, Any] = {"cycle": index, "kind": kind, "score_before": base_mean, "candidates": []}
        if kind == "A":
            inputs = scorer.bake_inputs("A", config.bake_inputs) if hasattr(scorer, "bake_inputs") else [""]
            best = None
            for number, prompt in enumerate(config.tool_prompts):
                set_seed(cycle_seed + number)
                candidate, bake_info = bake(copy.deepcopy(model), tokenizer, prompt, inputs)
                scores = scorer.score("A", candidate, tokenizer, baked=[*baked_prompts, prompt])
                stats = paired_bootstrap(current["A"], scores, weights, samples=config.bootstrap_samples,
                                         confidence=config.confidence, seed=cycle_seed)  # fmt: skip
                record["candidates"].append({"prompt": prompt, "source": "pool", "score": float(np.dot(weights, scores)
                                             / weights.sum()), **stats, "bake": bake_info})  # fmt: skip
                if best is None or stats["gain"] > best[2]["gain"]:
                    best = (candidate, scores, stats, prompt, bake_info, "pool")
                else:
                    del candidate
            winner_model, winner_scores, winner_stats, winner_prompt, winner_bake, source = best
        else:
            personas = write_self_descriptions(model, tokenizer, config, cycle_seed)
            best = None
            for persona in personas:
                prefix = persona["text"] + config.persona_separator
                scores = scorer.score("B", model, tokenizer, prefix=prefix, baked=baked_prompts)
                in_context = float(np.dot(weights, scores) / weights.sum())
                record["candidates"].append({"prompt": persona["text"], "source": persona["source"],
                                             "generated": persona["generated"],
                                             "self_perplexity": persona["self_perplexity"],
                                             "degenerate": persona["degenerate"],
                                             "score_in_context": in_context})  # fmt: skip
                if best is None or in_context > best[1]:
                    best = (persona, in_context)
            persona = best[0]
            inputs = scorer.bake_inputs("B", config.bake_inputs) if hasattr(scorer, "bake_inputs") else [""]
            set_seed(cycle_seed)
            persona_prompt = persona["text"] + config.persona_separator
            winner_model, winner_bake = bake(copy.deepcopy(model), tokenizer, persona_prompt, inputs)
            winner_prompt, source = persona["text"], persona["source"]
            winner_scores = scorer.score("B", winner_model, tokenizer, baked=[*baked_prompts, winner_prompt])
            winner_stats = paired_bootstrap(current["B"], winner_scores, weights, samples=config.bootstrap_samples,
                                            confidence=config.confidence, seed=cycle_seed)  # fmt: skip
        kept = keep_decision(winner_stats, config.min_gain)
        record.update(
            winner=winner_prompt, winner_source=source, gain=winner_stats["gain"], ci_low=winner_stats["ci_low"],
            ci_high=winner_stats["ci_high"], n_items=winner_stats["n"], kept=kept, bake=winner_bake,
            score_after=float(np.dot(weights, winner_scores) / weights.sum()) if kept else base_mean,
        )  # fmt: skip
        if kept:
            model = winner_model
            baked_prompts.append(winner_prompt)
            state.baked.append({"cycle": index, "kind": kind, "prompt": winner_prompt, "source": source,
                                "fraction": fraction, **winner_bake})  # fmt: skip
            state.baked[-1]["cumulative_nominal_strength"] = _ledger_strength(state.baked, winner_prompt, fraction)
            current[kind] = winner_scores
            other = "B" if kind == "A" else "A"
            current[other] = scorer.score(other, model, tokenizer, baked=baked_prompts)
            state.streak[kind] = 0
            state.streak[other] = 0  # the model changed: the other kind may improve again
        else:
            del winner_model
            state.streak[kind] += 1
        record["scores_now"] = {k: float(np.dot(scorer.weights(k), current[k]) / scorer.weights(k).sum())
                                for k in ("A", "B")}  # fmt: skip
        record["seconds"] = round(time.time() - started, 1)
        state.cycles.append(record)
        logger.info("Phase 6 cycle %d (%s): winner gain %+.3f [%.3f, %.3f] -> %s", index, kind, record["gain"],
                    record["ci_low"], record["ci_high"], "kept" if kept else "not kept")  # fmt: skip
        progress.update(1)
        progress.set_postfix(kind=kind, gain=f"{record['gain']:+.3f}", kept=kept)
        if on_cycle is not None:
            on_cycle(model, state)
    progress.close()
    return model, state


# ----------------------------------------------------------------------------------------------------------------
# Plots and the phase


def ab_plots(folder: Path, state: LoopState) -> None:
    """`plots/ab_scores.png` (current A and B scores after each cycle) and `plots/ab_gains.png` (winner gain with its
    interval per cycle, kept ones marked)."""
    if not state.cycles:
        return
    xs = [c["cycle"] for c in state.cycles]
    line_plot(folder / "plots" / "ab_scores.png",
              {"A: code pass@1": (xs, [c["scores_now"]["A"] for c in state.cycles]),
               "B: suite score": (xs, [c["scores_now"]["B"] for c in state.cycles])},
              title="Phase 6: scores of the current model after each cycle", xlabel="cycle",
              ylabel="score")  # fmt: skip
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for c in state.cycles:
        color = "tab:green" if c["kept"] else "tab:gray"
        axis.errorbar([c["cycle"]], [c["gain"]], yerr=[[c["gain"] - c["ci_low"]], [c["ci_high"] - c["gain"]]],
                      fmt="o", color=color, capsize=4)  # fmt: skip
        axis.annotate(c["kind"], (c["cycle"], c["gain"]), textcoords="offset points", xytext=(6, 4))
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_title("Phase 6: winner's paired gain and bootstrap interval (green = kept)")
    axis.set_xlabel("cycle")
    axis.set_ylabel("gain over current model")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "plots" / "ab_gains.png")
    plt.close(figure)


def _load(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def _prepare_bitnet(model) -> bool:
    """A packed BitNet input becomes trainable (shadow weights) for baking; returns whether to pack it again."""
    if not getattr(model.config, "bitnet", None):
        return False
    from modeling_forge.bitnet import BitLinear, bitnet_to_shadow

    if any(isinstance(m, BitLinear) and m.packed for m in model.modules()):
        bitnet_to_shadow(model)
        return True
    return False


def _save_work(work: Path, model, tokenizer, state: LoopState) -> None:
    """Checkpoint the loop after a cycle: the current model (when a bake changed it) and the state, atomically."""
    work.mkdir(parents=True, exist_ok=True)
    if state.cycles and state.cycles[-1]["kept"]:
        with atomic_directory(work / "model", overwrite=True) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    tmp = work / "state.json.tmp"
    tmp.write_text(json.dumps(state.to_dict(), indent=2, default=str))
    tmp.replace(work / "state.json")


def _mean(scorer: Scorer, kind: str, scores: np.ndarray) -> float:
    weights = scorer.weights(kind)
    return float(np.dot(weights, scores) / weights.sum())


def run_phase6(config: PersonaConfig, scorer: Scorer | None = None, bake: BakeFn | None = None) -> dict:
    """Run Phase 6 end to end and return a summary (history, final scores, `output_dir`)."""
    started = time.time()
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    if not config.model_name_or_path:
        raise ValueError("PersonaConfig.model_name_or_path is not set. Fix: pass the previous phase's folder.")
    if output_dir.exists() and not config.overwrite:
        raise FileExistsError(f"{output_dir} already holds a finished Phase 6. Fix: choose another output_dir or "
                              "pass --overwrite.")  # fmt: skip
    work = output_dir.parent / f".{output_dir.name}-work"
    state = None
    source = config.model_name_or_path
    if config.resume and (work / "state.json").exists():
        state = LoopState.from_dict(json.loads((work / "state.json").read_text()))
        if (work / "model").exists():
            source = str(work / "model")
        logger.info("Phase 6: resuming after %d finished cycles from %s", len(state.cycles), source)
    elif work.exists():
        import shutil

        shutil.rmtree(work)
    model, tokenizer = _load(source)
    if model.config.model_type != "forge":
        raise ValueError(f"{source} is a {model.config.model_type!r} model. Fix: Phase 6 takes a Forge checkpoint.")
    repack = _prepare_bitnet(model)
    scorer = scorer or TaskScorer(config)
    current = None
    if state is None:
        state = LoopState()
        current = {k: scorer.score(k, model, tokenizer) for k in ("A", "B")}
        state.input_scores = {k: _mean(scorer, k, current[k]) for k in ("A", "B")}
    input_scores = state.input_scores

    tracker = LoopTracker(config.report_to, project=config.project, run_name=f"{output_dir.parent.name}-phase6",
                          config=dataclasses.asdict(config))  # fmt: skip

    def checkpoint(current_model, loop_state: LoopState) -> None:
        _save_work(work, current_model, tokenizer, loop_state)
        record = loop_state.cycles[-1]  # each A/B cycle to the tracking backends, as EvoMerge's generations
        tracker.log({"ab/gain": record["gain"], "ab/ci_low": record["ci_low"], "ab/ci_high": record["ci_high"],
                     "ab/kept": float(record["kept"]), "ab/score_A": record["scores_now"]["A"],
                     "ab/score_B": record["scores_now"]["B"]}, step=len(loop_state.cycles))  # fmt: skip

    model, state = run_ab_cycles(model, tokenizer, config, scorer, bake=bake, state=state, on_cycle=checkpoint,
                                 current=current)  # fmt: skip
    tracker.finish()
    baked = [b["prompt"] for b in state.baked]
    final_scores = {k: _mean(scorer, k, scorer.score(k, model, tokenizer, baked=baked)) for k in ("A", "B")}
    if repack:
        from modeling_forge.bitnet import pack_bitnet

        pack_bitnet(model)
    model.eval()
    history = {"input": config.model_name_or_path, "stopped": state.stopped, "input_scores": input_scores,
               "final_scores": final_scores, "cycles": state.cycles, "baked": state.baked,
               "streak": state.streak, "settings": {"min_gain": config.min_gain, "confidence": config.confidence,
               "bootstrap_samples": config.bootstrap_samples, "patience": config.patience,
               "max_cycles": config.max_cycles, "bake": config.bake_config().to_dict()}}  # fmt: skip
    metrics = {
        "phase6/cycles": len(state.cycles),
        "phase6/kept_bakes": len(state.baked),
        "phase6/input_code_pass@1": input_scores["A"],
        "phase6/final_code_pass@1": final_scores["A"],
        "phase6/input_suite_score": input_scores["B"],
        "phase6/final_suite_score": final_scores["B"],
    }
    wall = time.time() - started
    if scorer is not None and not isinstance(scorer, TaskScorer):
        history["scorer"] = type(scorer).__name__

    def write_extras(folder: Path) -> None:
        (folder / HISTORY_FILE).write_text(json.dumps(history, indent=2, default=str))
        ab_plots(folder, state)

    save_phase_output(
        output_dir, model=model, tokenizer=tokenizer, phase=6, phase_name="persona",
        config=config.to_dict(), inputs=[config.model_name_or_path],
        metrics=metrics, seed=config.seed, wall_time_s=wall, datasets=sorted(config.suite),
        tags=["prompt-baking", "persona", "tool-use"], card_sections={"history": history},
        card_template="phase6_persona", model_name=f"forge-phase6-persona-{Path(config.model_name_or_path).name}",
        write_extras=write_extras, overwrite=config.overwrite,
        push_to_hub=(config.hub_model_id or f"{output_dir.parent.name}-phase6") if config.push_to_hub else None,
    )  # fmt: skip
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return {"output_dir": str(output_dir), "history": history, "metrics": metrics, "wall_time_s": wall}


__all__ = [
    "HISTORY_FILE",
    "Item",
    "LoopState",
    "Scorer",
    "TaskScorer",
    "ab_plots",
    "degeneracy_reasons",
    "keep_decision",
    "paired_bootstrap",
    "run_ab_cycles",
    "run_phase6",
    "self_perplexity",
    "write_self_descriptions",
]
