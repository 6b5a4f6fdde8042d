"""Phase 5 (curriculum): the model learns to code at the edge of its ability, with a sandboxed tool, hints, baking,
self-modeling and dreams.

`run_phase5(config)` loads the previous phase's folder (Phase 4's packed ternary model is turned back into shadow
weights, trained with MuGrokfast in STE mode and packed again at the end), then:

1. **Placement.** pass@k per code level on held-out problems, sampled in the sandbox; training starts at the level
   whose success rate is closest to `placement_target` (the edge of ability; LILO's p(1-p) is largest there).
2. **Per level**, rounds of: attempt pool tasks (drawn with weight p(1-p) of each task's smoothed success rate,
   LILO arXiv 2502.12272); the model writes the body (thinking first in a `<think>` span when it has Phase 3's thought
   tokens; spans are stripped before execution); the programs run in the sandbox in concurrent batches
   (`evaluation.sandbox` via the code family). Success: a variant replaces the task, `successes_to_remove`
   consecutive successes remove it. Failure: the teacher's hint (procedural by default, offline) and a retry with the
   hint in context; with a hint ladder (`hint_solution_fractions`) each further retry also shows a larger part of the
   teacher's verified solution (QuestA's partial solutions, arXiv 2507.13266), written into the function for the
   model to continue or as comment lines. The round trains on the successes and on the hinted successes **without the
   hint or the shown solution** in context (STaR's rationalization, Zelikman et al. 2022; with a prefix rung the
   trained body is the program that passed: the shown part plus the model's continuation), plus a replay share of
   earlier levels; with `success_variants` also verified variants of each success (its constants rewritten to a
   variant's, kept only if the variant's tests pass in the sandbox), with `experience_buffer` also the level's
   earlier verified pairs. The level ends when the
   pool has shrunk to `mastery_fraction` of its size or the round budget is spent.
3. **After each level:** half-bakes of the eudaimonia, OODA and identity prompts (`bake_prompt` machinery, LoRA on
   the ternary layers via `trainers.bitnet_lora`); self-modeling in temperature bands (the model predicts masked
   tokens of its own generations, tagged with the temperature; accuracy per band before/after); dream consolidation
   (one epoch on the model's own programs for training tasks of the levels so far, several samples per task, kept
   only when they pass the task's tests in the sandbox (`dream_filter: verified`, DreamCoder/STaR), mixed with real
   reference solutions, never on self-samples alone: Shumailov et al. 2024), with the held-out NLL of those levels
   before/after the dream.

Each finished level is checkpointed atomically in `.<output>-work/level-<n>/`; `--resume` continues after the last.
The phase folder holds the packed model, `curriculum_report.json`, plots, card and lineage.

Written here, because no kept library does it: the pool bookkeeping, the placement rule, the masked self-prediction
examples and the dream mix. Generation is `model.generate`; training is `ForgeTrainer` (transformers `Trainer`),
one short run per round (so the optimizer's state, Grokfast EMA and momenta, restarts every round); bakes are
`trainers.baking_trainer`; execution is `evaluation.sandbox`. Under `accelerate launch` every process generates and
runs the same attempts (same seeds) and the training runs are data-parallel.
"""

import dataclasses
import json
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging

from evaluation.tasks import get_task_family
from evaluation.tasks.base import Example
from evaluation.tasks.code import STOP_SEQUENCES, CodeFamily, truncate_completion
from hub_cards import line_plot
from modeling_forge.bitnet import bitnet_to_shadow, pack_bitnet
from modeling_forge.tokenization import THOUGHT_START

from .baking_trainer import run_prompt_baking
from .base import ForgeTrainer
from .checkpointing import atomic_directory
from .curriculum_config import CurriculumConfig
from .phase_output import save_phase_output
from .quietstar_trainer import (  # spans and stray thought tokens removed: the code that runs
    ThoughtDataset,
    strip_thoughts,
)
from .teachers import Teacher, get_teacher
from .tracking import LoopTracker

logger = logging.get_logger(__name__)

REPORT_FILE = "curriculum_report.json"
STATE_FILE = "curriculum_state.json"
MASK_NOTE = "the pad token stands in for a masked token"


def split_context(prompt: str) -> tuple[str, str]:
    """(context, suffix): the prompt without its trailing whitespace, and that whitespace. The model continues the
    context and writes the newline and indent itself: BPE merges them with the next token ("\n    return") in
    training text, so a prompt ending in a bare newline is a token boundary the model has rarely seen (it answers
    EOS). Completions are therefore continuations of the context, and training uses the same context."""
    context = prompt.rstrip()
    return context, prompt[len(context) :]


def generation_context(prompt: str) -> str:
    """What the model continues: `split_context`'s context, except that a prompt ending in a finished code line (a
    ladder rung showing the whole solution) keeps its final newline, so that ending the function is the natural
    continuation (measured: without it a tiny model extends the last line on templates it has not seen)."""
    context, suffix = split_context(prompt)
    finished_code = suffix == "\n" and not context.endswith('"""') and not context.endswith(":")
    return context + "\n" if finished_code else context


def reference_completion(example: Example) -> str:
    """The reference body as a continuation of the example's context (`split_context`)."""
    return split_context(example.prompt)[1] + example.target


def with_hint(prompt: str, hint: str) -> str:
    """The retry prompt: the hint as comment lines above the function (the model stays in code mode)."""
    lines = [line.strip() for line in hint.strip().splitlines() if line.strip()]
    return "".join(f"# {line}\n" for line in lines) + prompt


def partial_solution(body: str | None, fraction: float) -> str:
    """The first `fraction` of a solution body by characters, cut back to the last whitespace (so the model never
    continues inside a word), without trailing whitespace; '' for fraction 0 or no body, the whole body (ending in
    its newline: nothing is left but to end the function) at 1."""
    if not body or fraction <= 0:
        return ""
    if fraction >= 1:
        return body.rstrip() + "\n"
    cut = int(fraction * len(body))
    while cut > 0 and not body[cut].isspace():
        cut -= 1
    return body[:cut].rstrip() if body[:cut].strip() else ""


def ladder_prompt(prompt: str, hint: str, partial: str, form: str = "prefix") -> str:
    """A hint-ladder rung's prompt: the prose hint as comment lines above the function (`with_hint`), and the
    partial solution either written into the function for the model to continue ('prefix') or as comment lines
    after the hint ('comment'). With no partial solution it is the prose rung, `with_hint(prompt, hint)`."""
    if not partial:
        return with_hint(prompt, hint)
    if form == "prefix":
        return with_hint(prompt, hint) + partial.lstrip("\n")
    shown = "".join(f"# {line}\n" for line in partial.strip("\n").splitlines())
    return with_hint(prompt, hint).removesuffix(prompt) + "# Solution lines:\n" + shown + prompt


def ladder_completion(prompt: str, partial: str, completion: str, form: str = "prefix") -> str:
    """The completion that runs (and, when verified, trains) for a rung's output: with a 'prefix' rung the shown
    part of the solution plus the model's continuation, as a continuation of the task prompt's context; else the
    model's completion itself."""
    if form != "prefix" or not partial:
        return completion
    return split_context(prompt)[1] + partial.lstrip("\n") + completion


# ----------------------------------------------------------------------------------------------------------------
# The model as the loop sees it
# ----------------------------------------------------------------------------------------------------------------


class Policy(Protocol):
    """What the curriculum loop needs from a model: raw completions (thought spans kept) for prompts."""

    def complete(
        self, prompts: Sequence[str], *, temperature: float | None, num_samples: int, seed: int
    ) -> list[list[str]]: ...


class ModelPolicy:
    """`model.generate` continuations of each prompt's context (`generation_context`), decoded with thought tokens kept
    (other special tokens dropped); with `think` every completion starts inside a thought span (`<think>` is
    appended to the context and returned with the text). The code that runs is `prompt + strip_thoughts(completion)`
    (the completion's own leading newline then makes an empty line, which Python ignores)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int, think: bool, batch_size: int = 16) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.think, self.batch_size = max_new_tokens, think, batch_size

    @torch.no_grad()
    def complete(self, prompts, *, temperature, num_samples=1, seed=0):
        tokenizer, model = self.tokenizer, self.model
        prefix = THOUGHT_START if self.think else ""
        encoded = [tokenizer(generation_context(p) + prefix)["input_ids"] for p in prompts]
        sample = temperature is not None and temperature > 0
        drop = {i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id) if i is not None}
        out: list[list[str]] = [[] for _ in prompts]
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for start in range(0, len(encoded), self.batch_size):
                    chunk = encoded[start : start + self.batch_size]
                    batch = tokenizer.pad({"input_ids": chunk}, padding=True, padding_side="left", return_tensors="pt")
                    batch = batch.to(model.device)
                    kwargs = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}
                    generated = model.generate(
                        **batch,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=sample,
                        num_return_sequences=num_samples,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        stop_strings=list(STOP_SEQUENCES),
                        tokenizer=tokenizer,
                        **kwargs,
                    )[:, batch["input_ids"].shape[1] :]
                    for row, ids in enumerate(generated.tolist()):
                        if tokenizer.eos_token_id in ids:
                            ids = ids[: ids.index(tokenizer.eos_token_id)]
                        text = tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)
                        out[start + row // num_samples].append(prefix + text)
        finally:
            model.train(was_training)
        return out


# ----------------------------------------------------------------------------------------------------------------
# The task pool of one level
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PoolTask:
    """One task of a level's pool: the current example (a variant after each success) and its history."""

    task_id: int
    example: Example
    streak: int = 0
    attempts: int = 0
    successes: int = 0
    variants: int = 0
    hints: list[str] = field(default_factory=list)
    hinted_attempts: int = 0
    hinted_successes: int = 0
    rung_successes: list[int] = field(default_factory=list)  # hinted successes per rung of the hint ladder
    removed: bool = False

    @property
    def success_rate(self) -> float:
        """Unaided success rate with a uniform Beta(1, 1) prior: an unseen task counts as 0.5."""
        return (self.successes + 1) / (self.attempts + 2)


def pool_examples(family: CodeFamily, level: int, size: int, seed: int, sampling: str = "random") -> list[Example]:
    """A level's pool of `size` training-split tasks. 'random': the family's draw for the level. 'stratified':
    round-robin over the level's templates (in a seeded order) from a draw 8 times larger, so every template the
    level draws from is in the pool when `size` allows: a random pool of 16 can miss a template, which the level
    then never trains while held-out problems still test it."""
    if sampling == "random":
        return family.generate("train", size, seed=seed, difficulty=level)
    if sampling != "stratified":
        raise ValueError(f"pool sampling {sampling!r}. Fix: use 'stratified' or 'random'.")
    by_template: dict[str, list[Example]] = {}
    for example in family.generate("train", 8 * size, seed=seed, difficulty=level):
        by_template.setdefault(example.meta["template"], []).append(example)
    order = sorted(by_template)
    random.Random(seed).shuffle(order)
    chosen: list[Example] = []
    while len(chosen) < size and any(by_template.values()):
        for template in order:
            if by_template[template] and len(chosen) < size:
                chosen.append(by_template[template].pop(0))
    return chosen


class TaskPool:
    """A level's pool. Success: a variant replaces the task (`make_variant`); `successes_to_remove` consecutive
    successes remove it. Failure resets the streak and attaches the hint. The pool shrinking is the mastery signal."""

    def __init__(self, examples: Sequence[Example], family: CodeFamily, successes_to_remove: int = 3) -> None:
        self.tasks = [PoolTask(i, example) for i, example in enumerate(examples)]
        self.family = family
        self.successes_to_remove = successes_to_remove
        self.initial_size = len(self.tasks)

    @property
    def active(self) -> list[PoolTask]:
        return [task for task in self.tasks if not task.removed]

    def sample(self, n: int, rng: random.Random, weighting: str = "lilo") -> list[PoolTask]:
        """Up to `n` distinct active tasks; 'lilo' draws with weight p(1-p) of the smoothed success rate."""
        active = self.active
        if n >= len(active):
            return active
        weights = [t.success_rate * (1 - t.success_rate) if weighting == "lilo" else 1.0 for t in active]
        chosen: list[PoolTask] = []
        for _ in range(n):  # weighted sampling without replacement
            index = rng.choices(range(len(active)), weights=weights)[0]
            chosen.append(active.pop(index))
            weights.pop(index)
        return chosen

    def record_success(self, task: PoolTask) -> None:
        task.attempts += 1
        task.successes += 1
        task.streak += 1
        if task.streak >= self.successes_to_remove:
            task.removed = True
        else:
            task.example = self.family.make_variant(task.example, seed=task.variants + 1)
            task.variants += 1

    def record_hinted_success(self, task: PoolTask, rung: int, variant: bool = False) -> None:
        """A success with a hint: counted per ladder rung, never towards removal (the streak stays 0); with
        `variant` the task is replaced by a variant, so a task solved only with help is not trained again on the
        very same instance every round (fresh constants instead of a memorized solution)."""
        task.hinted_successes += 1
        task.rung_successes += [0] * (rung + 1 - len(task.rung_successes))
        task.rung_successes[rung] += 1
        if variant:
            task.example = self.family.make_variant(task.example, seed=task.variants + 1)
            task.variants += 1

    def record_failure(self, task: PoolTask) -> None:
        task.attempts += 1
        task.streak = 0

    def mastered(self, fraction: float) -> bool:
        return len(self.active) <= fraction * self.initial_size

    def stats(self) -> dict:
        return {
            "initial": self.initial_size,
            "active": len(self.active),
            "removed": self.initial_size - len(self.active),
            "templates": len({task.example.meta.get("template") for task in self.tasks}),
            "variants": sum(t.variants for t in self.tasks),
            "hints": sum(len(t.hints) for t in self.tasks),
            "hinted_successes": sum(t.hinted_successes for t in self.tasks),
            "hinted_successes_per_rung": _sum_lists([t.rung_successes for t in self.tasks]),
        }


def _sum_lists(lists: Sequence[Sequence[int]]) -> list[int]:
    """Element-wise sums of lists of unequal length."""
    width = max((len(x) for x in lists), default=0)
    return [sum(x[i] for x in lists if i < len(x)) for i in range(width)]


class SolutionCache:
    """The teacher's solution bodies for the hint ladder, asked once per task (variant) and, unless the teacher's
    are verified by construction (procedural: the reference), checked in the sandbox first: a wrong solution is
    never shown. Where the teacher has none, the ladder stops at prose hints (logged)."""

    def __init__(self, teacher: Teacher, family: CodeFamily) -> None:
        self.teacher, self.family = teacher, family
        self.bodies: dict[str, str | None] = {}
        self.programs = 0  # sandbox runs spent verifying

    def get(self, examples: Sequence[Example]) -> list[str | None]:
        todo = list({e.key: e for e in examples if e.key not in self.bodies}.values())
        if todo:
            bodies = list(self.teacher.solutions(todo))
            if not self.teacher.solutions_verified:
                checkable = [i for i, body in enumerate(bodies) if body]
                ran = self.family.run([todo[i] for i in checkable],
                                      [split_context(todo[i].prompt)[1] + bodies[i] for i in checkable])  # fmt: skip
                self.programs += len(checkable)
                for i, result in zip(checkable, ran, strict=True):
                    if result is None or not result.passed:
                        bodies[i] = None
            missing = sum(1 for body in bodies if not body)
            if missing:
                logger.warning("Phase 5: teacher %r gave no verified solution for %d of %d tasks; their hint-ladder "
                               "rungs show the prose hint only.", self.teacher.name, missing, len(todo))  # fmt: skip
            self.bodies.update({e.key: body for e, body in zip(todo, bodies, strict=True)})
        return [self.bodies[e.key] for e in examples]


@dataclass
class TrainingPair:
    """A training example: the prompt (never the hint) and the successful completion that ran (thoughts kept)."""

    prompt: str
    completion: str
    kind: str  # "success", "hinted", "variant" (`constant_variants`), "replay" or "dream"
    level: int


def training_completion(completion: str) -> str:
    """What a success trains on: the completion cut at the first stop sequence (thought spans kept when the cut
    leaves the executed code unchanged, else the code alone)."""
    cut = truncate_completion(completion)
    code = truncate_completion(strip_thoughts(completion))
    return cut if truncate_completion(strip_thoughts(cut)) == code else code


_INT_EDGE = r"(?<![\w.]){}(?![\w.])"  # an integer literal not inside a name or another number


def rewrite_constants(completion: str, old: dict, new: dict) -> str | None:
    """`completion` with the task's constants (`meta['params']`) changed from the `old` to the `new` values wherever
    they appear as literals, all at once: integers by magnitude (`x - 5` becomes `x - 7` for -5 -> -7, so the sign
    the code writes stays right; a sign change is refused), strings as quoted literals ('a' or "a"). None when a
    changed constant is not a literal of the completion (the code does not copy it, so rewriting cannot carry it),
    two constants share a literal but change differently, or a value is neither int nor str. The result is only a
    candidate: it trains only after it passes the variant's tests in the sandbox."""
    replacements: dict[str, str] = {}
    patterns: list[str] = []
    for name, before in old.items():
        after = new.get(name)
        if after == before:
            continue
        if isinstance(before, bool) or isinstance(after, bool) or type(before) is not type(after):
            return None
        if isinstance(before, int):
            if (before < 0) != (after < 0):
                return None
            forms = [(str(abs(before)), str(abs(after)), _INT_EDGE.format(abs(before)))]
        elif isinstance(before, str):
            forms = [(repr(before), repr(after), None), (json.dumps(before), json.dumps(after), None)]
        else:
            return None
        found = False
        for literal, replacement, pattern in forms:
            if replacements.get(literal, replacement) != replacement:
                return None
            pattern = pattern or re.escape(literal)
            if re.search(pattern, completion):
                found = True
                replacements[literal] = replacement
                patterns.append(pattern)
        if not found:
            return None
    if not patterns:
        return None
    combined = re.compile("|".join(sorted(set(patterns), key=len, reverse=True)))
    return combined.sub(lambda match: replacements[match.group(0)], completion)


def constant_variants(
    solved: Sequence[tuple[Example, str]], family: CodeFamily, k: int, seed: int, level: int
) -> tuple[list[TrainingPair], int]:
    """Up to `k` verified variants per solved task: `make_variant` gives the same template with new constants, the
    solved completion gets the same constants rewritten (`rewrite_constants`), and the rewritten program trains only
    if it passes the variant's own tests in the sandbox (a completion that does not copy its constants yields none).
    Each success then teaches copying the constants from the docstring across many values, not one instance's
    constants. Returns (pairs, programs run)."""
    if k <= 0 or not solved:
        return [], 0
    candidates: list[tuple[Example, str]] = []
    for example, completion in solved:
        made, seen = 0, {example.key}
        for attempt in range(4 * k):
            if made >= k:
                break
            try:
                variant = family.make_variant(example, seed=seed + 7 * attempt + 1)
            except ValueError:  # a template with no other constants in this split
                break
            if variant.key in seen:
                continue
            seen.add(variant.key)
            rewritten = rewrite_constants(completion, example.meta["params"], variant.meta["params"])
            if rewritten is not None:
                candidates.append((variant, rewritten))
                made += 1
    if not candidates:
        return [], 0
    results = family.run([c[0] for c in candidates], [strip_thoughts(c[1]) for c in candidates])
    pairs = [TrainingPair(variant.prompt, completion, "variant", level)
             for (variant, completion), result in zip(candidates, results, strict=True)
             if result is not None and result.passed]  # fmt: skip
    return pairs, len(candidates)


def run_level(
    pool: TaskPool,
    policy: Policy,
    teacher: Teacher,
    train: Callable[[list[TrainingPair]], dict],
    *,
    level: int,
    config: CurriculumConfig,
    replay: Sequence[TrainingPair] = (),
    seed: int = 0,
    on_round: Callable[[dict], None] | None = None,
    learned: list[TrainingPair] | None = None,
) -> list[dict]:
    """Run one level's rounds until its pool is mastered or `config.max_rounds` is spent; returns per-round records.
    The level's own training pairs (successes and hinted successes) are appended to `learned` when given."""
    rng = random.Random(seed)
    family = pool.family
    rounds = []
    solutions = SolutionCache(teacher, family)
    history: list[TrainingPair] = []  # the level's verified pairs of earlier rounds (`experience_buffer`)
    for index in range(config.max_rounds):
        if pool.mastered(config.mastery_fraction):
            break
        started = time.time()
        tasks = pool.sample(config.attempts_per_round, rng, config.task_sampling)
        examples = [task.example for task in tasks]
        attempts = [c[0] for c in policy.complete([e.prompt for e in examples], temperature=config.temperature,
                                                    num_samples=1, seed=seed + 1000 * index)]  # fmt: skip
        results = family.run(examples, [strip_thoughts(a) for a in attempts])
        programs = len(examples)
        pairs: list[TrainingPair] = []
        solved: list[tuple[Example, str]] = []  # (task instance, verified completion): the variants' sources
        failed = []
        for task, example, attempt, result in zip(tasks, examples, attempts, results, strict=True):
            if result is not None and result.passed:
                pairs.append(TrainingPair(example.prompt, training_completion(attempt), "success", level))
                solved.append((example, pairs[-1].completion))
                pool.record_success(task)
            else:
                pool.record_failure(task)
                failed.append((task, example, attempt, result))
        unaided = len(pairs)
        hinted_attempts = hinted_successes = 0
        rungs, verified_before = [], solutions.programs
        for retry in range(config.hint_retries):
            if not failed:
                break
            fraction = config.hint_solution_fractions[retry]
            form = config.hint_solution_format
            hints = teacher.hints([f[1] for f in failed], [f[3] for f in failed],
                                  [strip_thoughts(f[2]) for f in failed], family)  # fmt: skip
            bodies = solutions.get([f[1] for f in failed]) if fraction > 0 else [None] * len(failed)
            partials = [partial_solution(body, fraction) for body in bodies]
            prompts = [ladder_prompt(f[1].prompt, hint, partial, form)
                       for f, hint, partial in zip(failed, hints, partials, strict=True)]  # fmt: skip
            outputs = [c[0] for c in policy.complete(prompts, temperature=config.temperature, num_samples=1,
                                                     seed=seed + 1000 * index + 100 * (retry + 1))]  # fmt: skip
            retries = [ladder_completion(f[1].prompt, partial, out, form)
                       for f, partial, out in zip(failed, partials, outputs, strict=True)]  # fmt: skip
            retry_results = family.run([f[1] for f in failed], [strip_thoughts(a) for a in retries])
            programs += len(failed)
            still = []
            rung = {"rung": retry, "fraction": fraction, "attempts": len(failed),
                    "solution_shown": sum(1 for p in partials if p), "successes": 0}  # fmt: skip
            for (task, example, _, _), hint, attempt, result in zip(failed, hints, retries, retry_results,
                                                                    strict=True):  # fmt: skip
                task.hints.append(hint)
                task.hinted_attempts += 1
                hinted_attempts += 1
                if result is not None and result.passed:  # trained WITHOUT hint or solution: the task's own prompt
                    pool.record_hinted_success(task, retry, config.variant_after_hinted_success)
                    hinted_successes += 1
                    rung["successes"] += 1
                    pairs.append(TrainingPair(example.prompt, training_completion(attempt), "hinted", level))
                    solved.append((example, pairs[-1].completion))
                else:
                    still.append((task, example, attempt, result))
            rungs.append(rung)
            failed = still
        programs += solutions.programs - verified_before  # the teacher's solutions checked in the sandbox
        variants, tried = constant_variants(solved, family, config.success_variants, seed + 1000 * index, level)
        programs += tried
        pairs += variants
        if learned is not None:
            learned.extend(pairs)
        n_buffer = min(len(history), config.experience_buffer) if pairs else 0
        earlier = rng.sample(history, n_buffer) if n_buffer else []
        history.extend(pairs)
        pairs += earlier
        n_replay = 0
        if pairs and replay and config.replay_share > 0:
            n_replay = min(len(replay), round(len(pairs) * config.replay_share / (1 - config.replay_share)))
            pairs += rng.sample(list(replay), n_replay)
        sandbox_s = time.time() - started
        trained = train(pairs) if pairs else {}
        record = {
            "level": level,
            "round": index,
            "attempted": len(tasks),
            "successes": unaided,
            "success_rate": unaided / max(len(tasks), 1),
            "hinted_attempts": hinted_attempts,
            "hinted_successes": hinted_successes,
            "rungs": rungs,
            "variant_candidates": tried,
            "variant_pairs": len(variants),
            "buffered": n_buffer,
            "replayed": n_replay,
            "programs": programs,
            "generate_and_run_s": sandbox_s,
            "pool_active": len(pool.active),
            "train": trained,
        }
        rounds.append(record)
        logger.info("Phase 5 level %d round %d: %d/%d solved, %d/%d with hints (per rung %s), pool %d/%d", level,
                    index, unaided, len(tasks), hinted_successes, hinted_attempts,
                    [r["successes"] for r in rungs], len(pool.active), pool.initial_size)  # fmt: skip
        if on_round is not None:
            on_round(record)
    return rounds


# ----------------------------------------------------------------------------------------------------------------
# Placement and evaluation
# ----------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def success_rates(
    policy: Policy, family: CodeFamily, examples: Sequence[Example], *, k: int, temperature: float | None, seed: int
) -> tuple[float, float, int]:
    """(pass@1, pass@k, programs run) of `k` samples per example (greedy when `temperature` is None, then k=1)."""
    samples = policy.complete([e.prompt for e in examples], temperature=temperature, num_samples=k, seed=seed)
    flat_examples = [e for e, s in zip(examples, samples, strict=True) for _ in s]
    results = family.run(flat_examples, [strip_thoughts(c) for s in samples for c in s])
    correct, cursor = [], 0
    for s in samples:
        correct.append(sum(1 for r in results[cursor : cursor + len(s)] if r is not None and r.passed))
        cursor += len(s)
    n = len(samples[0]) if samples else 1
    p1 = sum(pass_at_k(n, c, 1) for c in correct) / max(len(correct), 1)
    pk = sum(pass_at_k(n, c, min(k, n)) for c in correct) / max(len(correct), 1)
    return p1, pk, len(results)


def choose_start_level(rates: dict[int, float], target: float = 0.5) -> int:
    """The level whose success rate is closest to `target` (ties: the easier level)."""
    return min(rates, key=lambda level: (abs(rates[level] - target), level))


def place(policy: Policy, family: CodeFamily, config: CurriculumConfig) -> dict:
    """pass@k per level on validation-split problems, and the start level at the edge of ability."""
    first, last = config.levels
    per_level, programs = {}, 0
    for level in range(first, last + 1):
        examples = family.generate("validation", config.placement_problems, seed=config.seed, difficulty=level)
        p1, pk, ran = success_rates(policy, family, examples, k=config.placement_k,
                                    temperature=config.temperature, seed=config.seed + level)  # fmt: skip
        per_level[level] = {"pass@1": p1, f"pass@{config.placement_k}": pk, "lilo_weight": p1 * (1 - p1)}
        programs += ran
    start = choose_start_level({lv: r["pass@1"] for lv, r in per_level.items()}, config.placement_target)
    return {"per_level": per_level, "start_level": start, "target": config.placement_target, "programs": programs,
            "k": config.placement_k, "problems_per_level": config.placement_problems}  # fmt: skip


def evaluate_levels(policy: Policy, family: CodeFamily, levels: Sequence[int], config: CurriculumConfig) -> dict:
    """Greedy pass@1 on test-split problems per level (the held-out success the card reports)."""
    out = {}
    for level in levels:
        examples = family.generate("test", config.eval_problems, seed=config.seed, difficulty=level)
        out[level], _, _ = success_rates(policy, family, examples, k=1, temperature=None, seed=0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training runs (Trainer), self-modeling and dreams
# ----------------------------------------------------------------------------------------------------------------


def pad_collator(pad_id: int) -> Callable[[Sequence[dict]], dict]:
    """Right-pads `input_ids` (pad id, attention 0) and `labels` (-100) to the longest example of the batch."""

    def collate(items: Sequence[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def completion_item(tokenizer, prompt: str, completion: str, max_length: int) -> dict:
    """`context + completion + EOS` (the context as `ModelPolicy` generates from it, `split_context`) with labels on
    the completion (and EOS) only; cut to `max_length` tokens."""
    prompt_ids = list(tokenizer(split_context(prompt)[0])["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def train_items(model, items: Sequence[dict], config: CurriculumConfig, pad_id: int, work_dir: Path,
                epochs: float, lr_scale: float = 1.0) -> dict:  # fmt: skip
    """One short `ForgeTrainer` run (MuGrokfast, STE mode on ternary layers) over `items` at `lr_scale` times the
    configured learning rate; returns its losses."""
    if not items:
        return {}
    world = PartialState().num_processes
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world
    steps = max(1, math.ceil(len(items) * epochs / per_step))
    args = dataclasses.replace(config, output_dir=str(work_dir / "trainer"), max_steps=steps, push_to_hub=False,
                               hub_model_id=None, resume_from_checkpoint=None, disable_tqdm=True,
                               logging_steps=max(1, min(steps, int(config.logging_steps))),
                               learning_rate=config.learning_rate * lr_scale)  # fmt: skip
    trainer = ForgeTrainer(
        model=model, args=args, train_dataset=ThoughtDataset(items), data_collator=pad_collator(pad_id)
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    shutil.rmtree(work_dir / "trainer", ignore_errors=True)
    return {"steps": steps, "examples": len(items), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}  # fmt: skip


def band_temperatures(bands: int, low: float, high: float) -> list[float]:
    """Midpoints of `bands` equal temperature ranges spanning [low, high]."""
    width = (high - low) / bands
    return [low + (i + 0.5) * width for i in range(bands)]


def self_model_tag(temperature: float) -> str:
    return f"# self-model: my own code at temperature {temperature:.2f}\n"


def masked_self_items(tokenizer, prompt: str, completion: str, rate: float, rng: random.Random,
                      max_length: int) -> dict | None:  # fmt: skip
    """A self-prediction example: `rate` of the generation's tokens are replaced by the mask id in the input and
    are the only labels (the model predicts its own masked tokens from the tagged prompt and the rest)."""
    item = completion_item(tokenizer, prompt, completion, max_length)
    positions = [i for i, label in enumerate(item["labels"]) if label != -100 and label != tokenizer.eos_token_id]
    if not positions:
        return None
    masked = rng.sample(positions, max(1, round(rate * len(positions))))
    ids, labels = list(item["input_ids"]), [-100] * len(item["input_ids"])
    for i in masked:
        labels[i] = ids[i]
        ids[i] = tokenizer.pad_token_id  # MASK_NOTE
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def masked_accuracy(model, items: Sequence[dict], pad_id: int) -> float:
    """Share of masked tokens the model predicts exactly (argmax) in `items`."""
    if not items:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = total = 0
    batch = pad_collator(pad_id)(items)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    correct += int((logits.argmax(-1)[mask] == targets[mask]).sum())
    total += int(mask.sum())
    model.train(was_training)
    return correct / max(total, 1)


def self_model(model, tokenizer, policy: ModelPolicy, prompts: Sequence[str], level: int, config: CurriculumConfig,
               work_dir: Path, seed: int) -> dict:  # fmt: skip
    """Self-modeling after a level: per temperature band, generate, mask, train on predicting the masked tokens;
    accuracy per band on held-out self-generations before and after."""
    if config.self_model_samples == 0 or not prompts:
        return {}
    rng = random.Random(seed)
    temperatures = band_temperatures(config.bands_for(level), *config.self_model_temperatures)
    train, held_out = [], {}
    for band, temperature in enumerate(temperatures):
        chosen = [rng.choice(prompts) for _ in range(2 * config.self_model_samples)]
        tagged = [self_model_tag(temperature) + p for p in chosen]
        outs = policy.complete(tagged, temperature=temperature, num_samples=1, seed=seed + band)
        items = [masked_self_items(tokenizer, p, o[0], config.self_model_mask_rate, rng, config.max_length)
                 for p, o in zip(tagged, outs, strict=True)]  # fmt: skip
        items = [i for i in items if i is not None]
        half = len(items) // 2
        train += items[:half]
        held_out[f"{temperature:.2f}"] = items[half:]
    before = {t: masked_accuracy(model, items, tokenizer.pad_token_id) for t, items in held_out.items()}
    trained = train_items(model, train, config, tokenizer.pad_token_id, work_dir, config.self_model_epochs)
    after = {t: masked_accuracy(model, items, tokenizer.pad_token_id) for t, items in held_out.items()}
    return {"bands": len(temperatures), "accuracy_before": before, "accuracy_after": after, "train": trained,
            "mean_before": _mean(before.values()), "mean_after": _mean(after.values())}  # fmt: skip


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def reference_nll(model, tokenizer, examples: Sequence[Example], max_length: int) -> float:
    """Mean per-token NLL of the reference bodies of `examples` (a forgetting probe that needs no generation)."""
    items = [completion_item(tokenizer, e.prompt, reference_completion(e), max_length) for e in examples]
    was_training = model.training
    model.eval()
    batch = pad_collator(tokenizer.pad_token_id)(items)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    nll = F.cross_entropy(logits[mask], targets[mask])
    model.train(was_training)
    return float(nll)


def _program_key(completion: str) -> str:
    """The code a dream runs, cut at the first stop sequence and without trailing spaces per line: two dreams with
    the same key are the same program (deduplicated)."""
    code = truncate_completion(strip_thoughts(completion))
    return "\n".join(line.rstrip() for line in code.strip("\n").splitlines())


def dream_pairs(policy: Policy, family: CodeFamily, levels: Sequence[int], config: CurriculumConfig,
                seed: int) -> tuple[list[TrainingPair], dict]:  # fmt: skip
    """The dreams of one consolidation epoch: `dream_samples` training-split tasks of `levels` (split evenly), each
    sampled `dream_samples_per_task` times at `dream_temperature`. 'verified' (`dream_filter`): the programs (thought
    spans stripped) run against their task's tests in the sandbox and only distinct passing ones are kept (the
    model's own verified programs for earlier levels: DreamCoder's replay, STaR's filter); 'none': every non-empty
    dream is kept, unchecked. With `dream_variants` (verified only) each kept dream also brings its verified
    constant variants (`constant_variants`, as `success_variants` in the loop). Returns the pairs (trained as the
    loop's successes are: `training_completion`) and counts per level (generated, passed, kept) and in all."""
    per_level = max(1, config.dream_samples // len(levels))
    tasks = [(lv, e) for lv in levels for e in family.generate("train", per_level, seed=seed, difficulty=lv)]
    outs = policy.complete([e.prompt for _, e in tasks], temperature=config.dream_temperature,
                           num_samples=config.dream_samples_per_task, seed=seed)  # fmt: skip
    candidates = [(lv, e, c) for (lv, e), samples in zip(tasks, outs, strict=True) for c in samples
                  if _program_key(c)]  # fmt: skip
    generated = sum(len(samples) for samples in outs)
    verified = config.dream_filter == "verified"
    if verified and candidates:
        results = family.run([e for _, e, _ in candidates], [strip_thoughts(c) for _, _, c in candidates])
        passing = [cand for cand, r in zip(candidates, results, strict=True) if r is not None and r.passed]
    else:
        passing = candidates
    pairs, seen = [], set()
    solved: dict[int, list[tuple[Example, str]]] = {}  # the kept dreams: sources of `dream_variants`
    per_level_counts = {lv: {"generated": 0, "passed": 0, "kept": 0} for lv in levels}
    for lv, _ in tasks:
        per_level_counts[lv]["generated"] += config.dream_samples_per_task
    for lv, example, completion in passing:
        per_level_counts[lv]["passed"] += 1
        key = (example.prompt, _program_key(completion))
        if verified and key in seen:
            continue
        seen.add(key)
        per_level_counts[lv]["kept"] += 1
        pairs.append(TrainingPair(example.prompt, training_completion(completion), "dream", lv))
        solved.setdefault(lv, []).append((example, pairs[-1].completion))
    variant_pairs, tried = [], 0
    if verified and config.dream_variants:
        for lv, kept in solved.items():
            made, ran = constant_variants(kept, family, config.dream_variants, seed, lv)
            variant_pairs += made
            tried += ran
    if not verified:
        for counts in per_level_counts.values():
            counts["passed"] = None  # not checked
    stats = {"filter": config.dream_filter, "temperature": config.dream_temperature, "generated": generated,
             "passed": len(passing) if verified else None, "kept": len(pairs),
             "programs": (len(candidates) if verified else 0) + tried, "per_level": per_level_counts,
             "variant_candidates": tried, "variants": len(variant_pairs)}  # fmt: skip
    return pairs + variant_pairs, stats


def levels_to_dream(done_levels: Sequence[int], mode: str) -> list[int]:
    """The levels whose tasks the dream after the last of `done_levels` replays: all of them ('all') or the ones
    before it ('earlier'; none after the first level)."""
    if mode not in ("all", "earlier"):
        raise ValueError(f"dream_levels {mode!r}. Fix: use 'all' or 'earlier'.")
    return list(done_levels) if mode == "all" else list(done_levels[:-1])


def dream(model, tokenizer, policy: ModelPolicy, family: CodeFamily, levels: Sequence[int], config: CurriculumConfig,
          work_dir: Path, seed: int) -> dict:  # fmt: skip
    """Dream consolidation: one epoch on the kept dreams of `levels` (`dream_pairs`; by default only programs that
    passed their tests in the sandbox), mixed with real reference solutions (`dream_real_share` of the epoch), at
    `dream_lr_scale` times the learning rate; held-out reference NLL of those levels before and after. When no dream
    is kept the epoch is skipped: training on the real solutions alone would be replay, not consolidation of the
    model's own programs."""
    rng = random.Random(seed)
    pairs, stats = dream_pairs(policy, family, levels, config, seed)
    probe = [e for lv in levels for e in family.generate("validation", 4, seed=seed, difficulty=lv)]
    before = reference_nll(model, tokenizer, probe, config.max_length)
    summary = {**stats, "dreams": stats["kept"], "levels": list(levels), "heldout_nll_before": before}
    if not pairs:
        logger.info("Phase 5 dreams on levels %s: none of %d kept (%s filter); the dream epoch is skipped.",
                    list(levels), stats["generated"], config.dream_filter)  # fmt: skip
        return {**summary, "real": 0, "train": {}, "skipped": True, "heldout_nll_after": before}
    items = [completion_item(tokenizer, p.prompt, p.completion, config.max_length) for p in pairs]
    n_real = max(1, round(len(pairs) * config.dream_real_share / (1 - config.dream_real_share)))
    real = [e for lv in levels for e in family.generate("train", n_real, seed=seed + 1, difficulty=lv)]
    real = rng.sample(real, min(n_real, len(real)))
    items += [completion_item(tokenizer, e.prompt, reference_completion(e), config.max_length) for e in real]
    rng.shuffle(items)
    trained = train_items(model, items, config, tokenizer.pad_token_id, work_dir, 1.0, config.dream_lr_scale)
    trained["learning_rate"] = config.learning_rate * config.dream_lr_scale
    after = reference_nll(model, tokenizer, probe, config.max_length)
    logger.info("Phase 5 dreams on levels %s: %d generated, %s passed, %d kept + %d real; held-out NLL %.3f -> %.3f",
                list(levels), stats["generated"], stats["passed"], len(pairs), len(real), before, after)  # fmt: skip
    return {**summary, "real": len(real), "train": trained, "skipped": False, "heldout_nll_after": after}


def bake_level(model, tokenizer, config: CurriculumConfig, prompts: Sequence[str], seed: int):
    """Half-bake each configured prompt (eudaimonia, OODA, identity) in turn; returns the model and strengths."""
    bake_config = config.bake_config(seed)
    if bake_config is None:
        return model, {}
    strengths = {}
    for offset, (name, text) in enumerate(config.bake_prompts.items()):
        result = run_prompt_baking(model, tokenizer, text, dataclasses.replace(bake_config, seed=seed + offset),
                                   inputs=list(prompts) or [""])  # fmt: skip
        model = result.model
        strengths[name] = {"strength": result.strength, "kl_before": result.kl_initial, "kl_after": result.kl_final,
                           "nominal": result.nominal_strength}  # fmt: skip
    return model, strengths


# ----------------------------------------------------------------------------------------------------------------
# The phase
# ----------------------------------------------------------------------------------------------------------------


def _work_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}-work"


def _finished_levels(work_dir: Path) -> list[Path]:
    found = [(int(p.name.split("-")[1]), p) for p in work_dir.glob("level-*") if (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def load_input(config: CurriculumConfig, path: str | None = None):
    """The model (ternary layers in shadow form, trainable) and tokenizer; whether the model is ternary."""
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path or config.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path or config.model_name_or_path, dtype=torch.float32)
    if model.config.model_type != "forge":
        raise ValueError(f"{config.model_name_or_path} is a {model.config.model_type!r} model. Fix: Phase 5 takes a "
                         "Forge checkpoint (Phase 4's output).")  # fmt: skip
    ternary = model.config.bitnet is not None
    if ternary and model.config.bitnet["format"] == "packed":
        bitnet_to_shadow(model)  # train the shadow weights with STE; packed again at the end
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs pad and eos tokens. Fix: use the tokenizer of a Forge phase folder.")
    return model, tokenizer, ternary


def _use_thoughts(config: CurriculumConfig, model, tokenizer) -> bool:
    if config.thinking != "auto":
        return config.thinking == "on"
    return THOUGHT_START in tokenizer.get_vocab() and getattr(model, "thought_mixer", None) is not None


def run_phase5(config: CurriculumConfig) -> dict:
    """Run Phase 5 end to end and return a summary (the report plus where it was written)."""
    state = PartialState()
    started = time.time()
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not config.overwrite:
        raise FileExistsError(f"{output_dir} already holds a finished Phase 5. Fix: choose another output_dir or "
                              "pass --overwrite.")  # fmt: skip
    work_dir = _work_dir(output_dir)
    finished = _finished_levels(work_dir) if config.resume else []
    if not config.resume and work_dir.exists():
        shutil.rmtree(work_dir)
    model, tokenizer, ternary = load_input(config, str(finished[-1]) if finished else None)
    family = get_task_family(
        "code",
        timeout_s=config.sandbox_timeout_s,
        memory_mb=config.sandbox_memory_mb,
        max_workers=config.sandbox_workers,
        require_isolation=config.require_isolation,
    )
    teacher = get_teacher(config.teacher, **config.teacher_kwargs)
    think = _use_thoughts(config, model, tokenizer)
    policy = ModelPolicy(model, tokenizer, max_new_tokens=config.max_new_tokens, think=think)

    if finished:
        saved = json.loads((finished[-1] / STATE_FILE).read_text())
        placement, levels, records = saved["placement"], saved["levels"], saved["records"]
        before, replay = {int(k): v for k, v in saved["before"].items()}, [TrainingPair(**p) for p in saved["replay"]]
        logger.info("Phase 5: resuming after level %s from %s", records[-1]["level"], finished[-1])
    else:
        placement = place(policy, family, config)
        start = placement["start_level"]
        levels = list(range(start, min(start + config.num_levels - 1, config.levels[1]) + 1))
        before = evaluate_levels(policy, family, levels, config)
        records, replay = [], []
        logger.info("Phase 5: placement %s -> levels %s", placement["per_level"], levels)

    def train_round(pairs: list[TrainingPair]) -> dict:
        items = [completion_item(tokenizer, p.prompt, p.completion, config.max_length) for p in pairs]
        return train_items(model, items, config, tokenizer.pad_token_id, work_dir, config.train_epochs)

    tracker = LoopTracker(config.report_to if state.is_main_process else "none", project=config.project,
                          run_name=f"{Path(config.output_dir).parent.name}-phase5-levels")  # fmt: skip
    todo = levels[len(records) :]
    for level in tqdm(todo, desc="Phase 5 levels", disable=config.disable_tqdm or not state.is_main_process):
        level_started = time.time()
        examples = pool_examples(family, level, config.pool_size, config.seed, config.pool_sampling)
        pool = TaskPool(examples, family, config.successes_to_remove)
        learned: list[TrainingPair] = []
        rounds = run_level(pool, policy, teacher, train_round, level=level, config=config, replay=replay,
                           seed=config.seed + 7919 * level, learned=learned)  # fmt: skip
        replay += [dataclasses.replace(p, kind="replay") for p in learned]
        prompts = [e.prompt for e in examples]
        model, bakes = bake_level(model, tokenizer, config, prompts[:8], config.seed + level)
        policy.model = model
        selfmodel = self_model(model, tokenizer, policy, prompts, level, config, work_dir, config.seed + level)
        done_levels = levels[: levels.index(level) + 1]
        dream_levels = levels_to_dream(done_levels, config.dream_levels)
        dreams = dream(model, tokenizer, policy, family, dream_levels, config, work_dir, config.seed + level) \
            if config.dreams and dream_levels else {}  # fmt: skip
        after = evaluate_levels(policy, family, done_levels, config)
        records.append({"level": level, "rounds": rounds, "pool": pool.stats(), "bakes": bakes,
                        "self_model": selfmodel, "dreams": dreams, "success_after": after,
                        "mastered": pool.mastered(config.mastery_fraction),
                        "wall_time_s": time.time() - level_started})  # fmt: skip
        tracker.log({"curriculum/level": level, "curriculum/pass@1_this_level": after[level],  # each level
                     "curriculum/pass@1_levels_so_far": sum(after.values()) / len(after),
                     "curriculum/wall_time_s": records[-1]["wall_time_s"]}, step=level)  # fmt: skip
        if state.is_main_process:
            with atomic_directory(work_dir / f"level-{level}", overwrite=True) as folder:
                model.save_pretrained(folder)
                payload = {"placement": placement, "levels": levels, "records": records, "before": before,
                           "replay": [dataclasses.asdict(p) for p in replay]}  # fmt: skip
                (folder / STATE_FILE).write_text(json.dumps(payload, indent=2))
        state.wait_for_everyone()
    tracker.finish()

    if ternary:
        pack_bitnet(model)
    model.eval()
    summary = {"output_dir": str(output_dir)}
    if state.is_main_process:
        report = _report(config, placement, levels, before, records, ternary, think)
        _save(config, output_dir, model, tokenizer, report, time.time() - started)
        shutil.rmtree(work_dir, ignore_errors=True)
        summary.update(report=report, wall_time_s=time.time() - started)
    state.wait_for_everyone()
    return summary


def backward_transfer(levels: Sequence[int], records: Sequence[dict]) -> dict:
    """BWT (Lopez-Paz & Ranzato 2017, as in LAMOL): mean over levels but the last of (success at the end - success
    right after training that level); per level too. Negative = forgetting."""
    if len(records) < 2:
        return {"bwt": None, "per_level": {}}
    final = records[-1]["success_after"]
    per_level = {}
    for record in records[:-1]:
        level = record["level"]
        per_level[level] = final[str(level)] - record["success_after"][str(level)]
    return {"bwt": sum(per_level.values()) / len(per_level), "per_level": per_level}


def _report(config: CurriculumConfig, placement: dict, levels: list[int], before: dict, records: list[dict],
            ternary: bool, think: bool) -> dict:  # fmt: skip
    """The `curriculum_report.json` content; every number was measured in this run."""
    records = json.loads(json.dumps(records))  # level keys as strings throughout (as when resumed)
    final = records[-1]["success_after"] if records else {}
    per_level = {
        str(level): {"before": before[level], "after": final.get(str(level)),
                     "gain": final[str(level)] - before[level] if str(level) in final else None}
        for level in levels
    }  # fmt: skip
    rounds = [r for record in records for r in record["rounds"]]
    dreams = [record["dreams"] for record in records if record["dreams"]]
    programs = placement["programs"] + sum(r["programs"] for r in rounds) + sum(d.get("programs", 0) for d in dreams)
    run_s = sum(r["generate_and_run_s"] for r in rounds)
    return {
        "input": config.model_name_or_path,
        "ternary": ternary,
        "thinking": think,
        "placement": placement,
        "levels": levels,
        "success": per_level,
        "records": records,
        "backward_transfer": backward_transfer(levels, records),
        "totals": {
            "rounds": len(rounds),
            "attempts": sum(r["attempted"] for r in rounds),
            "unaided_successes": sum(r["successes"] for r in rounds),
            "hints_used": sum(r["hinted_attempts"] for r in rounds),
            "hinted_successes": sum(r["hinted_successes"] for r in rounds),
            "success_variants": config.success_variants,
            "variant_pairs_trained": sum(r.get("variant_pairs", 0) for r in rounds),
            "variant_candidates": sum(r.get("variant_candidates", 0) for r in rounds),
            "hint_solution_fractions": list(config.hint_solution_fractions),
            "hint_solution_format": config.hint_solution_format,
            "hinted_successes_per_rung": _sum_lists([[x["successes"] for x in r.get("rungs", [])] for r in rounds]),
            "hinted_attempts_per_rung": _sum_lists([[x["attempts"] for x in r.get("rungs", [])] for r in rounds]),
            "dreams_generated": sum(d.get("generated", 0) for d in dreams),
            "dreams_passed": sum(d.get("passed") or 0 for d in dreams),
            "dreams_kept": sum(d.get("kept", d.get("dreams", 0)) for d in dreams),
            "dream_filter": config.dream_filter if dreams else None,
            "dream_levels": config.dream_levels if dreams else None,
            "programs_run": programs,
            "loop_generate_and_run_s": run_s,
            "loop_programs_per_s": sum(r["programs"] for r in rounds) / run_s if run_s > 0 else None,
        },
    }


def _plots(folder: Path, report: dict) -> None:
    records = report["records"]
    if any(r["rounds"] for r in records):
        series = {f"level {r['level']}": ([x["round"] for x in r["rounds"]], [x["pool_active"] for x in r["rounds"]])
                  for r in records if r["rounds"]}  # fmt: skip
        line_plot(folder / "plots" / "pool_size.png", series, title="Phase 5: active pool per round",
                  xlabel="round", ylabel="tasks left")  # fmt: skip
    levels = report["levels"]
    success = report["success"]
    series = {"input": (levels, [success[str(lv)]["before"] for lv in levels])}
    if all(success[str(lv)]["after"] is not None for lv in levels):
        series["after Phase 5"] = (levels, [success[str(lv)]["after"] for lv in levels])
    line_plot(folder / "plots" / "success_per_level.png", series, title="Phase 5: held-out pass@1 per level",
              xlabel="level", ylabel="pass@1 (greedy)")  # fmt: skip
    bands = [r for r in records if r["self_model"]]
    if bands:
        last = bands[-1]["self_model"]
        temps = sorted(last["accuracy_before"], key=float)
        line_plot(folder / "plots" / "self_model_accuracy.png",
                  {"before": ([float(t) for t in temps], [last["accuracy_before"][t] for t in temps]),
                   "after": ([float(t) for t in temps], [last["accuracy_after"][t] for t in temps])},
                  title=f"Phase 5: self-prediction accuracy (level {bands[-1]['level']})", xlabel="temperature",
                  ylabel="masked-token accuracy")  # fmt: skip


def _save(config: CurriculumConfig, output_dir: Path, model, tokenizer, report: dict, wall_time: float) -> None:
    metrics = {}
    for level, values in report["success"].items():
        metrics[f"curriculum/level{level}_pass@1_before"] = values["before"]
        if values["after"] is not None:
            metrics[f"curriculum/level{level}_pass@1_after"] = values["after"]
    metrics.update({f"curriculum/{k}": v for k, v in report["totals"].items() if v is not None})
    metrics["curriculum/start_level"] = report["placement"]["start_level"]
    if report["backward_transfer"]["bwt"] is not None:
        metrics["curriculum/bwt"] = report["backward_transfer"]["bwt"]
    for record in report["records"]:
        level = record["level"]
        metrics[f"curriculum/level{level}_pool_left"] = record["pool"]["active"]
        for name, bake in record["bakes"].items():
            metrics[f"bake/level{level}_{name}_strength"] = bake["strength"]
        if record["self_model"]:
            metrics[f"self_model/level{level}_accuracy_before"] = record["self_model"]["mean_before"]
            metrics[f"self_model/level{level}_accuracy_after"] = record["self_model"]["mean_after"]
        if record["dreams"]:
            metrics[f"dream/level{level}_heldout_nll_before"] = record["dreams"]["heldout_nll_before"]
            metrics[f"dream/level{level}_heldout_nll_after"] = record["dreams"]["heldout_nll_after"]
    eval_results = [
        {"dataset": "agent-forge/code", "split": "test", "metric": "pass@1", "metric_name": f"pass@1 level {lv}",
         "value": v["after"]}
        for lv, v in report["success"].items() if v["after"] is not None
    ]  # fmt: skip

    def write_extras(folder: Path) -> None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
        _plots(folder, report)

    save_phase_output(
        output_dir, model=model, tokenizer=tokenizer, phase=5, phase_name="curriculum",
        config={"curriculum": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
                "model_bitnet": model.config.bitnet},
        inputs=[config.model_name_or_path], metrics=metrics, eval_results=eval_results, seed=config.seed,
        wall_time_s=wall_time, datasets=["agent-forge/code"], tags=["curriculum", "code", "sandbox"],
        card_sections={"report": report}, card_template="phase5_curriculum",
        model_name=f"forge-phase5-curriculum-{Path(config.model_name_or_path).name}", write_extras=write_extras,
        overwrite=config.overwrite,
        push_to_hub=(config.hub_model_id or f"{output_dir.parent.name}-phase5") if config.push_to_hub else None,
    )  # fmt: skip


__all__ = [
    "ModelPolicy",
    "PoolTask",
    "TaskPool",
    "TrainingPair",
    "backward_transfer",
    "band_temperatures",
    "choose_start_level",
    "constant_variants",
    "dream",
    "dream_pairs",
    "levels_to_dream",
    "evaluate_levels",
    "generation_context",
    "ladder_completion",
    "ladder_prompt",
    "masked_self_items",
    "partial_solution",
    "pass_at_k",
    "place",
    "pool_examples",
    "reference_completion",
    "rewrite_constants",
    "run_level",
    "run_phase5",
    "split_context",
    "strip_thoughts",
    "with_hint",
]
