"""Phase 2 (EvoMerge): an evolutionary search over merge recipes of the Phase 1 models.

The genome: a three-stage merge pipeline. With parents P_1..P_n (Phase 1's three specialisations) and their common
ancestor B (Phase 1's init, found in their lineage), a candidate is

    stage 1  S  = interp(P_1..P_n; w)                  linear or SLERP (weighted chain), weights w
    stage 2  T  = B + lambda * merge(tau(S), tau(P_1), .., tau(P_n); v, density)
                                                       TIES or DARE-TIES over task vectors tau(X) = X - B, weights v
    stage 3  C  = layers(pool = [P_1..P_n, S, T])      FrankenMerge (layer i from a chosen pool member) or a DFS path
                                                       (any sequence of (pool member, layer, input scale) steps);
                                                       every non-layer tensor (embedding and tied head, final norm,
                                                       TRM refiner, ACT head) and the config come from T
    config   C's TRM depth and ACT threshold: T's (the merge rule: weighted means of the parents' values), or
             evolved values (the recipe's `config_overrides`; initial candidates follow the rule)

so each stage's output joins the pool the next stage draws from (as Sakana's recipe feeds a parameter-space merge
into a data-flow-space one). The 2x2x2 choices of (linear|SLERP) -> (TIES|DARE) -> (Franken|DFS) are the initial
population. Every genome is written as a mergekit-style multi-stage recipe (`MergeRecipe`), which is also what
the champion's card embeds and what the fitness cache is keyed by (the hash of the recipe, so genes a candidate
does not express never cause a re-evaluation).

Each generation keeps the `elites` best unchanged, fills half the remaining slots with mutated copies of the
elites and the rest with crossovers of pairs of the other ("losing") candidates; when the population's mean
pairwise genome distance falls below `diversity_threshold`, fresh random genomes replace part of the new
candidates. The search stops after `generations` or when the best fitness has not improved by more than
`plateau_threshold` for `patience` generations. Its whole state is written atomically after every generation, so
`resume` continues from the last finished one with the same result as an uninterrupted run.

Fitness (`MergeFitness`): a weighted composite of held-out perplexity, task accuracy and answer likelihood on
Phase 1's task families (through the evaluation harness), speed (forward FLOPs per token, a deterministic stand-in
for tokens per second; or timed tokens per second) and memory footprint (parameter bytes), each relative to the
best parent on that metric.

The search loop, operators and state handling are written here by hand: no kept library (mergekit's
`mergekit-evolve` needs CMA-ES, Ray and vLLM on GPUs) runs this kind of search over our in-memory merges.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from evaluation.tasks.base import stable_hash

from .checkpointing import current_umask
from .control import pause_point
from .evomerge_config import EvoMergeConfig
from .inputs import check_checkpoint_folder
from .merging import Checkpoint, MergeRecipe, build_model, load_checkpoint, run_recipe
from .tracking import LoopTracker

logger = logging.get_logger(__name__)

INTERP_METHODS = ("linear", "slerp")
TASK_METHODS = ("ties", "dare_ties")
LAYER_METHODS = ("franken", "dfs")
SOUP, TASK_VECTORS = "interp", "task_vectors"  # stage names; the pool is parents + these two
WEIGHT_RANGE = (0.0, 2.0)
DENSITY_RANGE = (0.1, 1.0)
LAMBDA_RANGE = (0.5, 2.0)
SCALE_RANGE = (0.5, 1.5)
ACT_RANGE = (0.1, 0.9)
STATE_FILE = "evolution_state.json"
RECORDS_FILE = "evolution.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# Genome.


@dataclass(frozen=True)
class GenomeSpace:
    """What genomes range over: the number of parents, the parents' layer count, the longest DFS path and the
    deepest TRM recursion a candidate may choose."""

    n_parents: int
    n_layers: int
    max_path_length: int
    max_trm_steps: int = 4

    @property
    def pool_size(self) -> int:
        """Stage-3 sources: the parents, the stage-1 and the stage-2 result."""
        return self.n_parents + 2


@dataclass(frozen=True)
class Genome:
    """One candidate: the genes of the three merge stages (see the module docstring)."""

    interp: str
    interp_weights: tuple[float, ...]
    task_method: str
    task_weights: tuple[float, ...]  # [stage-1 result, parents...]
    density: float
    scale: float  # lambda of the task-vector merge
    seed: int  # DARE's random drop
    layer_method: str
    franken_sources: tuple[int, ...]  # pool index per layer
    dfs_path: tuple[tuple[int, int, float], ...]  # (pool index, layer, input scale) per step
    # Non-shape config of the result (the recipe's `config_overrides`); None follows the merge rule.
    trm_max_steps: int | None = None
    act_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (lists instead of tuples)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Genome:
        """Inverse of `to_dict`."""
        return cls(
            interp=data["interp"],
            interp_weights=tuple(float(v) for v in data["interp_weights"]),
            task_method=data["task_method"],
            task_weights=tuple(float(v) for v in data["task_weights"]),
            density=float(data["density"]),
            scale=float(data["scale"]),
            seed=int(data["seed"]),
            layer_method=data["layer_method"],
            franken_sources=tuple(int(v) for v in data["franken_sources"]),
            dfs_path=tuple((int(p), int(layer), float(s)) for p, layer, s in data["dfs_path"]),
            trm_max_steps=None if data.get("trm_max_steps") is None else int(data["trm_max_steps"]),
            act_threshold=None if data.get("act_threshold") is None else float(data["act_threshold"]),
        )

    def recipe(self, parents: Sequence[str], base: str) -> MergeRecipe:
        """The three-stage mergekit-style recipe this genome expresses (numbers rounded to 4 decimals)."""
        pool = [*parents, SOUP, TASK_VECTORS]
        stage1 = {
            "name": SOUP,
            "merge_method": self.interp,
            "models": [
                {"model": p, "parameters": {"weight": _r(w)}}
                for p, w in zip(parents, self.interp_weights, strict=True)
            ],
        }
        stage2_params: dict[str, Any] = {"density": _r(self.density), "lambda": _r(self.scale)}
        if self.task_method.startswith("dare"):
            stage2_params["seed"] = self.seed
        stage2 = {
            "name": TASK_VECTORS,
            "merge_method": self.task_method,
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": _r(w)}}
                for m, w in zip([SOUP, *parents], self.task_weights, strict=True)
            ],
            "parameters": stage2_params,
        }
        if self.layer_method == "franken":
            steps = [(source, layer, 1.0) for layer, source in enumerate(self.franken_sources)]
        else:
            steps = list(self.dfs_path)
        slices = []
        for source, layer, scale in steps:
            entry = {"model": pool[source], "layer_range": [layer, layer + 1]}
            if _r(scale) != 1.0:
                entry["scale"] = _r(scale)
            slices.append({"sources": [entry]})
        stage3 = {"merge_method": self.layer_method, "base_model": TASK_VECTORS, "slices": slices}
        recipe = {"stages": [stage1, stage2, stage3], "dtype": "float32"}
        overrides = {"trm_max_steps": self.trm_max_steps, "act_threshold": _r(self.act_threshold or 0.0)}
        overrides = {k: v for k, v in overrides.items() if getattr(self, k) is not None}
        if overrides:
            recipe["config_overrides"] = overrides
        return MergeRecipe.from_dict(recipe)


def _r(value: float) -> float:
    return round(float(value), 4)


def _clip(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _fix_weights(weights: Sequence[float]) -> tuple[float, ...]:
    clipped = [_r(_clip(w, WEIGHT_RANGE)) for w in weights]
    if sum(clipped) <= 0:
        clipped[0] = 1.0
    return tuple(clipped)


def combo_genome(space: GenomeSpace, combo: tuple[str, str, str], rng: random.Random) -> Genome:
    """An initial candidate: the given (interp, task, layer) methods with neutral numeric genes (equal weights,
    density 0.5, lambda 1) and a random layer assignment (Franken: a random pool member per layer; DFS: the layers in
    order from random pool members plus one repeated layer)."""
    franken = tuple(rng.randrange(space.pool_size) for _ in range(space.n_layers))
    path = [(rng.randrange(space.pool_size), layer, 1.0) for layer in range(space.n_layers)]
    if len(path) < space.max_path_length:
        path.insert(rng.randrange(len(path) + 1), (rng.randrange(space.pool_size), rng.randrange(space.n_layers), 1.0))
    return Genome(
        interp=combo[0],
        interp_weights=(1.0,) * space.n_parents,
        task_method=combo[1],
        task_weights=(1.0,) * (space.n_parents + 1),
        density=0.5,
        scale=1.0,
        seed=rng.randrange(2**31),
        layer_method=combo[2],
        franken_sources=franken,
        dfs_path=tuple(path[: space.max_path_length]),
    )


def random_genome(space: GenomeSpace, rng: random.Random) -> Genome:
    """A fresh random candidate (re-injected when the population's diversity collapses)."""
    path_length = rng.randint(1, space.max_path_length)
    return Genome(
        interp=rng.choice(INTERP_METHODS),
        interp_weights=_fix_weights([rng.uniform(0.0, 1.5) for _ in range(space.n_parents)]),
        task_method=rng.choice(TASK_METHODS),
        task_weights=_fix_weights([rng.uniform(0.0, 1.5) for _ in range(space.n_parents + 1)]),
        density=_r(rng.uniform(*DENSITY_RANGE)),
        scale=_r(rng.uniform(0.7, 1.3)),
        seed=rng.randrange(2**31),
        layer_method=rng.choice(LAYER_METHODS),
        franken_sources=tuple(rng.randrange(space.pool_size) for _ in range(space.n_layers)),
        dfs_path=tuple(
            (rng.randrange(space.pool_size), rng.randrange(space.n_layers), _r(rng.uniform(0.8, 1.2)))
            for _ in range(path_length)
        ),
    )


def initial_population(space: GenomeSpace, size: int, rng: random.Random) -> list[Genome]:
    """The 2x2x2 method combinations (in a fixed order), then random genomes if `size` > 8 (truncated if < 8)."""
    combos = list(itertools.product(INTERP_METHODS, TASK_METHODS, LAYER_METHODS))
    population = [combo_genome(space, combo, rng) for combo in combos[:size]]
    while len(population) < size:
        population.append(random_genome(space, rng))
    return population


def _other(options: Sequence[str], value: str) -> str:
    return next(option for option in options if option != value)


def mutate(genome: Genome, space: GenomeSpace, rng: random.Random, rate: float, sigma: float) -> Genome:
    """A copy with each gene group changed with probability `rate`: method flips and config changes (at half the
    rate; the TRM depth to any allowed value or back to the merge rule, the ACT threshold by Gaussian noise or back),
    Gaussian weight / density / lambda / scale noise, per-layer source resampling, and one DFS path edit (change a
    step, rescale it, insert, delete or swap)."""
    g = genome.to_dict()
    if rng.random() < rate / 2:
        g["interp"] = _other(INTERP_METHODS, g["interp"])
    if rng.random() < rate / 2:
        g["task_method"] = _other(TASK_METHODS, g["task_method"])
    if rng.random() < rate / 2:
        g["layer_method"] = _other(LAYER_METHODS, g["layer_method"])
    for key in ("interp_weights", "task_weights"):
        if rng.random() < rate:
            g[key] = _fix_weights([w + rng.gauss(0.0, sigma) for w in g[key]])
    if rng.random() < rate:
        g["density"] = _r(_clip(g["density"] + rng.gauss(0.0, sigma), DENSITY_RANGE))
    if rng.random() < rate:
        g["scale"] = _r(_clip(g["scale"] + rng.gauss(0.0, sigma), LAMBDA_RANGE))
    if rng.random() < rate:
        g["seed"] = rng.randrange(2**31)
    g["franken_sources"] = [rng.randrange(space.pool_size) if rng.random() < rate else s for s in g["franken_sources"]]
    if rng.random() < max(rate, 0.5):
        g["dfs_path"] = _mutate_path([tuple(step) for step in g["dfs_path"]], space, rng, sigma)
    if rng.random() < rate / 2:
        g["trm_max_steps"] = rng.choice([None, *range(1, space.max_trm_steps + 1)])
    if rng.random() < rate / 2:
        start = 0.5 if g["act_threshold"] is None else g["act_threshold"]
        g["act_threshold"] = None if rng.random() < 0.2 else _r(_clip(start + rng.gauss(0.0, sigma), ACT_RANGE))
    return Genome.from_dict(g)


def _mutate_path(path: list[tuple], space: GenomeSpace, rng: random.Random, sigma: float) -> list[tuple]:
    ops = ["change", "rescale", "swap"] + (["insert"] if len(path) < space.max_path_length else [])
    ops += ["delete"] if len(path) > 1 else []
    op = rng.choice(ops)
    i = rng.randrange(len(path))
    if op == "change":
        path[i] = (rng.randrange(space.pool_size), rng.randrange(space.n_layers), path[i][2])
    elif op == "rescale":
        path[i] = (path[i][0], path[i][1], _r(_clip(path[i][2] + rng.gauss(0.0, sigma), SCALE_RANGE)))
    elif op == "swap" and len(path) > 1:
        j = rng.randrange(len(path))
        path[i], path[j] = path[j], path[i]
    elif op == "insert":
        path.insert(i, (rng.randrange(space.pool_size), rng.randrange(space.n_layers), 1.0))
    elif op == "delete":
        path.pop(i)
    return path


def crossover(a: Genome, b: Genome, space: GenomeSpace, rng: random.Random) -> Genome:
    """A child of two genomes: each method gene from either parent, numeric vectors blended with a random
    factor, per-layer sources chosen per layer, and the DFS path spliced (a prefix of one, a suffix of the other)."""
    da, db = a.to_dict(), b.to_dict()
    child: dict[str, Any] = {}
    for key in ("interp", "task_method", "layer_method", "seed", "trm_max_steps", "act_threshold"):
        child[key] = (da if rng.random() < 0.5 else db)[key]
    for key in ("interp_weights", "task_weights"):
        alpha = rng.random()
        child[key] = _fix_weights([alpha * x + (1 - alpha) * y for x, y in zip(da[key], db[key], strict=True)])
    for key, bounds in (("density", DENSITY_RANGE), ("scale", LAMBDA_RANGE)):
        alpha = rng.random()
        child[key] = _r(_clip(alpha * da[key] + (1 - alpha) * db[key], bounds))
    pairs = zip(da["franken_sources"], db["franken_sources"], strict=True)
    child["franken_sources"] = [rng.choice(pair) for pair in pairs]
    cut_a, cut_b = rng.randint(1, len(da["dfs_path"])), rng.randrange(len(db["dfs_path"]) + 1)
    child["dfs_path"] = (da["dfs_path"][:cut_a] + db["dfs_path"][cut_b:])[: space.max_path_length]
    return Genome.from_dict(child)


def genome_distance(a: Genome, b: Genome) -> float:
    """Distance in [0, 1] between the genes two candidates express: the mean of the three stages' distances (method
    mismatch counts 1; otherwise normalised differences of weights, density, lambda, layer sources or paths) and the
    config overrides' (TRM depth mismatch, ACT threshold difference)."""

    def weights(x: Sequence[float], y: Sequence[float]) -> float:
        sx, sy = sum(x) or 1.0, sum(y) or 1.0
        return 0.5 * sum(abs(p / sx - q / sy) for p, q in zip(x, y, strict=True))

    stage1 = 1.0 if a.interp != b.interp else weights(a.interp_weights, b.interp_weights)
    if a.task_method != b.task_method:
        stage2 = 1.0
    else:
        spread = (LAMBDA_RANGE[1] - LAMBDA_RANGE[0], DENSITY_RANGE[1] - DENSITY_RANGE[0])
        parts = [weights(a.task_weights, b.task_weights), abs(a.density - b.density) / spread[1]]
        parts.append(min(1.0, abs(a.scale - b.scale) / spread[0]))
        stage2 = sum(parts) / len(parts)
    if a.layer_method != b.layer_method:
        stage3 = 1.0
    elif a.layer_method == "franken":
        differ = sum(x != y for x, y in zip(a.franken_sources, b.franken_sources, strict=True))
        stage3 = differ / max(len(a.franken_sources), 1)
    else:
        longest = max(len(a.dfs_path), len(b.dfs_path))
        aligned = list(zip(a.dfs_path, b.dfs_path, strict=False))  # paths may differ in length
        same = sum(x[:2] == y[:2] for x, y in aligned)
        scales = sum(abs(x[2] - y[2]) for x, y in aligned if x[:2] == y[:2])
        stage3 = (longest - same + min(scales, same)) / longest
    config = 0.5 * (a.trm_max_steps != b.trm_max_steps)
    if (a.act_threshold is None) != (b.act_threshold is None):
        config += 0.5
    elif a.act_threshold is not None:
        config += 0.5 * abs(a.act_threshold - b.act_threshold) / (ACT_RANGE[1] - ACT_RANGE[0])
    return (stage1 + stage2 + stage3 + config) / 4


def population_diversity(genomes: Sequence[Genome]) -> float:
    """Mean pairwise `genome_distance` (0 = all identical)."""
    pairs = list(itertools.combinations(genomes, 2))
    return sum(genome_distance(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Fitness.


SPEED_METRICS = ("flops", "measured")


@dataclass
class FitnessSettings:
    """What a fitness evaluation measures (a subset of `EvoMergeConfig`)."""

    weights: dict[str, float]
    eval_tokens: int = 4096
    eval_seq_len: int = 256
    task_families: tuple[str, ...] = ("arithmetic", "kv_recall")
    task_examples: int = 32
    task_difficulty: int = 1
    task_accuracy_metric: str = "greedy_target"  # or "exact_match": greedy generation, scored like the evaluation
    task_max_new_tokens: int = 48
    speed_metric: str = "flops"
    speed_batch_size: int = 4
    speed_seq_len: int = 128
    speed_repeats: int = 3
    time_forward: bool = False  # also time tokens/s under the flops metric (reported, not scored)
    seed: int = 0


class MergeFitness:
    """Measures candidates on one data split and scores them relative to the best parent per metric.

    Raw metrics per model: `perplexity` (corpus text, `evaluation.perplexity`), `task_accuracy` (share of task
    answers the model would produce greedily, i.e. lm-eval's `is_greedy` of the whole target; or with
    `task_accuracy_metric="exact_match"` the share of greedy generations whose extracted answer is right, as the
    evaluation scores them) and `task_likelihood` (mean per-token probability of the reference answer), from
    `evaluation.harness` on the task families' examples, `flops_per_token` of an eval-mode forward over a fixed
    batch of the split's text (counted by `torch.utils.flop_counter.FlopCounterMode`, so ACT early exit and the
    layer count both show), `parameter_bytes`,
    and when timed `tokens_per_s` (fastest of `speed_repeats` forwards) and `relative_speed` (timed in alternation
    with the fastest parent).

    Parts: best/candidate for perplexity and bytes, candidate/best for likelihood, accuracy as is, and speed =
    the fastest parent's FLOPs per token / the candidate's (`speed_metric="flops"`, the default: deterministic, so
    neither the fitness cache nor an elite keeps a lucky timing) or the timed `relative_speed` ("measured": wall
    clock on a shared machine varies by tens of percent between calls). Fitness = sum(weight * part) / sum(weight).
    """

    def __init__(
        self,
        tokenizer,
        settings: FitnessSettings,
        *,
        split: str = "validation",
        reference_models: Mapping[str, Any] | None = None,
    ) -> None:
        from evaluation.benchmarks import get_eval_task
        from evaluation.corpus import corpus_texts
        from evaluation.harness import encode_pair

        if settings.speed_metric not in SPEED_METRICS:
            raise ValueError(f"speed_metric {settings.speed_metric!r} is not one of {SPEED_METRICS}")
        self.tokenizer = tokenizer
        self.settings = settings
        self.split = split
        # ~4 characters per token in this corpus; take enough text for eval_tokens, then `perplexity` cuts.
        self.texts = corpus_texts(split, max_chars=8 * settings.eval_tokens)
        if settings.task_accuracy_metric not in ("greedy_target", "exact_match"):
            raise ValueError(
                f"task_accuracy_metric {settings.task_accuracy_metric!r} is not greedy_target/exact_match"
            )
        self.requests: dict[str, list[tuple[str, str]]] = {}
        self.target_tokens: dict[str, list[int]] = {}
        self.tasks: dict[str, tuple[Any, list]] = {}  # family -> (EvalTask, docs), for exact_match
        for family in settings.task_families:
            task = get_eval_task(family).with_options(split=split, difficulty=settings.task_difficulty)
            docs = task.docs(limit=settings.task_examples, seed=settings.seed)
            self.tasks[family] = (task, docs)
            pairs = [(doc.prompt, doc.meta["example"].target) for doc in docs]
            self.requests[family] = pairs
            self.target_tokens[family] = [max(len(encode_pair(tokenizer, c, t)[1]), 1) for c, t in pairs]
        shape = (settings.speed_batch_size, settings.speed_seq_len)
        ids = tokenizer("\n".join(self.texts), add_special_tokens=False, verbose=False)["input_ids"]  # cut below
        ids = ids[: shape[0] * shape[1]]
        if len(ids) < shape[0] * shape[1]:
            raise ValueError(f"The {split} text has fewer than {shape[0] * shape[1]} tokens for the speed batch.")
        self.speed_batch = torch.tensor(ids).view(shape)  # (B, T) held-out text
        self.timed = settings.speed_metric == "measured" or settings.time_forward
        self.reference: dict[str, float] = {}
        self.reference_raw: dict[str, dict[str, float]] = {}
        self.speed_reference = None  # the fastest parent, timed beside every candidate ("measured")
        if reference_models:
            self.set_reference(reference_models)

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        """The raw metrics of one model."""
        from torch.utils.flop_counter import FlopCounterMode

        from evaluation.harness import generate_completions, loglikelihoods, score_completions
        from evaluation.perplexity import perplexity

        model.eval()
        s = self.settings
        ppl = perplexity(
            model,
            self.tokenizer,
            self.texts,
            max_length=s.eval_seq_len,
            stride=s.eval_seq_len,
            max_tokens=s.eval_tokens,
        ).perplexity
        accuracies, likelihoods = [], []
        for family, pairs in self.requests.items():
            results = loglikelihoods(model, self.tokenizer, pairs, batch_size=16)
            if s.task_accuracy_metric == "exact_match":
                task, docs = self.tasks[family]
                completions = generate_completions(
                    model, self.tokenizer, [doc.prompt for doc in docs], max_new_tokens=s.task_max_new_tokens,
                    batch_size=16, stop_sequences=task.stop_sequences, seed=s.seed,
                )  # fmt: skip
                accuracies.append(score_completions(task, docs, completions)[0][task.primary_metric])
            else:
                accuracies.append(sum(greedy for _, greedy in results) / len(results))
            per_token = [math.exp(lp / n) for (lp, _), n in zip(results, self.target_tokens[family], strict=True)]
            likelihoods.append(sum(per_token) / len(per_token))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=self.speed_batch, use_cache=False)
        raw = {
            "perplexity": float(ppl),
            "task_accuracy": sum(accuracies) / max(len(accuracies), 1),
            "task_likelihood": sum(likelihoods) / max(len(likelihoods), 1),
            "flops_per_token": counter.get_total_flops() / self.speed_batch.numel(),
            "parameter_bytes": float(sum(p.numel() * p.element_size() for p in model.parameters())),
        }
        if self.timed:
            raw["tokens_per_s"], relative_speed = self.time_speed(model)
            if relative_speed is not None:
                raw["relative_speed"] = relative_speed
        return raw

    @torch.no_grad()
    def time_speed(self, model) -> tuple[float, float | None]:
        """Tokens per second of an eval-mode forward (fastest of `speed_repeats`), and, under the "measured" metric
        once the reference is set, the speed relative to the fastest parent timed in alternation with it (repeat by
        repeat, which cancels slow load drift on a shared machine)."""

        def once(m) -> float:
            start = time.perf_counter()
            m(input_ids=self.speed_batch, use_cache=False)
            return time.perf_counter() - start

        reference = self.speed_reference if self.settings.speed_metric == "measured" else None
        models = [model] if reference is None else [model, reference]
        for m in models:
            m.eval()
            once(m)  # warm-up
        best = [math.inf] * len(models)
        for _ in range(self.settings.speed_repeats):
            for i, m in enumerate(models):
                best[i] = min(best[i], once(m))
        relative = None if reference is None else best[1] / best[0]
        return self.speed_batch.numel() / best[0], relative

    def set_reference(self, models: Mapping[str, Any]) -> None:
        """Measure the parents; the best value of each metric becomes that part's reference."""
        self.speed_reference = None
        self.reference_raw = {name: self.measure(model) for name, model in models.items()}
        if self.settings.speed_metric == "measured":
            fastest = max(self.reference_raw, key=lambda name: self.reference_raw[name]["tokens_per_s"])
            self.speed_reference = models[fastest]
            for name, model in models.items():
                self.reference_raw[name]["relative_speed"] = self.time_speed(model)[1]
        raws = list(self.reference_raw.values())
        self.reference = {
            "perplexity": min(r["perplexity"] for r in raws),
            "task_likelihood": max(r["task_likelihood"] for r in raws),
            "flops_per_token": min(r["flops_per_token"] for r in raws),
            "parameter_bytes": min(r["parameter_bytes"] for r in raws),
        }

    def score(self, raw: Mapping[str, float]) -> tuple[float, dict[str, float]]:
        """Fitness and its parts for raw metrics (needs the reference)."""
        ref = self.reference
        if self.settings.speed_metric == "flops":
            speed = ref["flops_per_token"] / raw["flops_per_token"]
        else:
            speed = raw["relative_speed"]
        parts = {
            "perplexity": ref["perplexity"] / raw["perplexity"],
            "task_accuracy": raw["task_accuracy"],
            "task_likelihood": raw["task_likelihood"] / max(ref["task_likelihood"], 1e-12),
            "speed": speed,
            "memory": ref["parameter_bytes"] / raw["parameter_bytes"],
        }
        weights = self.settings.weights
        fitness = sum(weights[k] * parts[k] for k in parts) / sum(weights.values())
        return fitness, parts

    def evaluate(self, model) -> dict[str, Any]:
        """Measure and score one model: `{"fitness", "parts", "raw"}`."""
        raw = self.measure(model)
        fitness, parts = self.score(raw)
        return {"fitness": fitness, "parts": parts, "raw": raw}


def formula(weights: Mapping[str, float]) -> str:
    """The fitness formula as text, for cards and logs."""
    total = sum(weights.values())
    return " + ".join(f"{w / total:.2f}*{part}" for part, w in weights.items() if w > 0)


# ---------------------------------------------------------------------------------------------------------------
# The search.


@dataclass
class SearchSettings:
    """The evolution's knobs (a subset of `EvoMergeConfig`)."""

    population_size: int = 8
    generations: int = 50
    elites: int = 2
    patience: int = 5
    plateau_threshold: float = 0.001
    mutation_rate: float = 0.3
    mutation_scale: float = 0.15
    diversity_threshold: float = 0.05
    reinject_fraction: float = 0.5
    seed: int = 0
    show_progress: bool = True


@dataclass
class EvolutionState:
    """Everything a resumed search needs, written after every generation."""

    settings: dict[str, Any]
    generation: int = -1  # last finished generation
    population: list[dict[str, Any]] = field(default_factory=list)  # its candidates, best first
    records: list[dict[str, Any]] = field(default_factory=list)  # every candidate of every generation
    history: list[dict[str, Any]] = field(default_factory=list)  # per generation: best, mean, diversity, ...
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)  # recipe key -> fitness result
    best: dict[str, Any] | None = None
    stale: int = 0
    reference_best: float | None = None
    stopped: str | None = None
    evaluations: int = 0
    cache_hits: int = 0
    search_seconds: float = 0.0

    @property
    def finished(self) -> bool:
        """Whether the search has stopped."""
        return self.stopped is not None

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file renamed into place)."""
        write_atomic(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> EvolutionState:
        """Read a saved state."""
        return cls(**json.loads(Path(path).read_text()))


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; read like any other written file
    os.replace(tmp, path)


def _candidate(genome: Genome, key: str, generation: int, index: int, origin: str, parents: list[str]) -> dict:
    return {
        "id": f"g{generation}-{index}",
        "generation": generation,
        "genome": genome.to_dict(),
        "key": key,
        "origin": origin,
        "parents": parents,
    }


def _next_population(
    state: EvolutionState,
    space: GenomeSpace,
    settings: SearchSettings,
    rng: random.Random,
    key_of: Callable[[Genome], str],
) -> tuple[list[tuple[Genome, str, list[str]]], bool]:
    """(genome, origin, parent ids) for the next generation, and whether fresh genomes were re-injected."""
    ranked = state.population  # best first
    genomes = [Genome.from_dict(c["genome"]) for c in ranked]
    ids = [c["id"] for c in ranked]
    n_elites = min(settings.elites, len(ranked))
    out: list[tuple[Genome, str, list[str]]] = [(genomes[i], "elite", [ids[i]]) for i in range(n_elites)]
    seen = {key_of(g) for g, _, _ in out}

    def add(make: Callable[[], Genome], origin: str, parents: list[str]) -> None:
        for _ in range(20):  # a new phenotype if possible (a duplicate would only be a cache hit)
            genome = make()
            if key_of(genome) not in seen:
                break
        seen.add(key_of(genome))
        out.append((genome, origin, parents))

    rest = settings.population_size - n_elites
    n_mutants = (rest + 1) // 2 if n_elites else 0
    for k in range(n_mutants):
        parent = k % n_elites
        add(lambda p=parent: mutate(genomes[p], space, rng, settings.mutation_rate, settings.mutation_scale),
            "mutation", [ids[parent]])  # fmt: skip
    losers = list(range(n_elites, len(ranked))) or list(range(len(ranked)))
    for k in range(settings.population_size - len(out)):
        a, b = losers[(2 * k) % len(losers)], losers[(2 * k + 1) % len(losers)]
        add(lambda a=a, b=b: crossover(genomes[a], genomes[b], space, rng), "crossover", [ids[a], ids[b]])
    collapsed = bool(state.history) and state.history[-1]["diversity"] < settings.diversity_threshold
    if collapsed:
        n_fresh = max(1, math.ceil(settings.reinject_fraction * rest))
        for slot in range(len(out) - n_fresh, len(out)):
            out[slot] = (random_genome(space, rng), "reinjection", [])
    return out, collapsed


def evolve(
    fitness: Callable[[Genome], Mapping[str, Any]],
    space: GenomeSpace,
    settings: SearchSettings,
    *,
    key_of: Callable[[Genome], str] | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    on_generation: Callable[[EvolutionState], None] | None = None,
) -> EvolutionState:
    """Run (or resume) the search; `fitness(genome)` returns at least `{"fitness": float}`.

    Results are cached by `key_of(genome)` (default: the genome's JSON; Phase 2 passes the recipe hash). With
    `state_path` the state is written after every generation; `resume=True` continues from it. `on_generation(state)`
    runs after each generation's state is saved (tracking, pause requests).
    """
    key_of = key_of or (lambda genome: json.dumps(genome.to_dict(), sort_keys=True))
    state_path = Path(state_path) if state_path else None
    settings_dict = asdict(settings)
    comparable = {k: v for k, v in settings_dict.items() if k not in ("generations", "show_progress")}
    if resume and state_path is not None and state_path.exists():
        state = EvolutionState.load(state_path)
        saved = {k: v for k, v in state.settings.items() if k not in ("generations", "show_progress")}
        if saved != comparable:
            changed = sorted(k for k in comparable if saved.get(k) != comparable[k])
            raise ValueError(
                f"Cannot resume: the saved search used different settings ({changed}). Fix: resume with the same "
                "settings, or start over with overwrite."
            )
        if state.stopped == "generations" and state.generation + 1 < settings.generations:
            state.stopped = None  # a longer budget continues a search that only ran out of generations
        logger.info("Resuming the search after generation %d", state.generation)
    else:
        state = EvolutionState(settings=settings_dict)
    state.settings = settings_dict

    while not state.finished:
        generation = state.generation + 1
        if generation >= settings.generations:
            state.stopped = "generations"
            break
        started = time.perf_counter()
        rng = random.Random(stable_hash("evomerge", settings.seed, generation))
        if generation == 0:
            plan = [(g, "initial", []) for g in initial_population(space, settings.population_size, rng)]
            reinjected = False
        else:
            plan, reinjected = _next_population(state, space, settings, rng, key_of)
        candidates, hits = [], 0
        bar = tqdm(plan, desc=f"generation {generation}", disable=not settings.show_progress, leave=False)
        for index, (genome, origin, parents) in enumerate(bar):
            key = key_of(genome)
            record = _candidate(genome, key, generation, index, origin, parents)
            if key in state.cache:
                hits += 1
                record["cached"] = True
            else:
                state.cache[key] = dict(fitness(genome))
                record["cached"] = False
            record.update(state.cache[key])
            candidates.append(record)
            bar.set_postfix(best=f"{max(c['fitness'] for c in candidates):.4f}")
        state.records.extend(candidates)  # in generation order (elites first)
        candidates = sorted(candidates, key=lambda c: -c["fitness"])  # stable: ties keep generation order
        state.population = candidates
        state.evaluations += len(candidates) - hits
        state.cache_hits += hits
        best = candidates[0]
        if state.best is None or best["fitness"] > state.best["fitness"]:
            state.best = best
        fitnesses = [c["fitness"] for c in candidates]
        diversity = population_diversity([Genome.from_dict(c["genome"]) for c in candidates])
        if state.reference_best is None or state.best["fitness"] - state.reference_best > settings.plateau_threshold:
            state.reference_best = state.best["fitness"]
            state.stale = 0
        else:
            state.stale += 1
        state.generation = generation
        state.search_seconds += time.perf_counter() - started
        state.history.append(
            {
                "generation": generation,
                "best": state.best["fitness"],
                "generation_best": best["fitness"],
                "mean": sum(fitnesses) / len(fitnesses),
                "diversity": diversity,
                "evaluated": len(candidates) - hits,
                "cache_hits": hits,
                "reinjected": reinjected,
                "seconds": time.perf_counter() - started,
            }
        )
        logger.info(
            "generation %d: best %.4f, mean %.4f, diversity %.3f, %d evaluated, %d cached",
            generation, state.best["fitness"], state.history[-1]["mean"], diversity, len(candidates) - hits, hits,
        )  # fmt: skip
        if state.stale >= settings.patience:
            state.stopped = "plateau"
        elif generation + 1 >= settings.generations:
            state.stopped = "generations"
        if state_path is not None:
            state.save(state_path)
        if on_generation is not None:
            on_generation(state)
    return state


# ---------------------------------------------------------------------------------------------------------------
# Phase 2 end to end.


def find_common_base(parents: Sequence[str | Path]) -> Path:
    """The nearest checkpoint every parent descends from, located on disk and verified by its weight hash.

    Reads each parent's `forge_lineage.json`; a recorded input path that does not exist relative to the working
    directory is also looked up beside the parent folder. Raises a ValueError when the parents share no ancestor
    (merging their task vectors would be meaningless) or when the shared one cannot be found.
    """
    from .phase_output import weights_sha256

    def ordered_inputs(lineage: Mapping[str, Any]) -> list[dict]:
        records = list(lineage.get("inputs", []))
        for parent in lineage.get("parents", []):
            records += ordered_inputs(parent)
        return records

    lineages, ancestries = [], []
    for parent in parents:
        path = Path(parent) / "forge_lineage.json"
        if not path.exists():
            raise ValueError(
                f"{parent} has no forge_lineage.json, so its initialisation is unknown. Fix: pass --base_model."
            )
        lineage = json.loads(path.read_text())
        lineages.append((Path(parent), ordered_inputs(lineage)))
        ancestries.append({r["sha256"] for r in lineages[-1][1] if r.get("sha256")})
    common = set.intersection(*ancestries)
    if not common:
        raise ValueError(
            f"The parents {[str(p) for p in parents]} share no ancestor in their lineage, so task vectors relative to "
            "a base are meaningless (they must start from one initialisation). Fix: use Phase 1 outputs of one run."
        )
    for parent, records in lineages:
        for record in records:
            if record.get("sha256") not in common:
                continue
            for candidate in (Path(record["id"]), parent.parent / Path(record["id"]).name):
                if candidate.is_dir() and weights_sha256(candidate) == record["sha256"]:
                    return candidate
    raise ValueError(
        f"The parents' common ancestor (weights sha256 {sorted(common)[0][:16]}...) was not found on disk. "
        "Fix: pass its folder as --base_model."
    )


def search_settings(config: EvoMergeConfig) -> SearchSettings:
    """The search knobs of a config."""
    return SearchSettings(
        population_size=config.population_size,
        generations=config.generations,
        elites=config.elites,
        patience=config.patience,
        plateau_threshold=config.plateau_threshold,
        mutation_rate=config.mutation_rate,
        mutation_scale=config.mutation_scale,
        diversity_threshold=config.diversity_threshold,
        reinject_fraction=config.reinject_fraction,
        seed=config.seed,
        show_progress=config.show_progress,
    )


def fitness_settings(config: EvoMergeConfig, *, final: bool = False) -> FitnessSettings:
    """The fitness knobs of a config (`final`: the larger held-out test evaluation)."""
    return FitnessSettings(
        weights=dict(config.fitness_weights),
        eval_tokens=config.final_eval_tokens if final else config.eval_tokens,
        eval_seq_len=config.eval_seq_len,
        task_families=tuple(config.task_families),
        task_examples=config.final_task_examples if final else config.task_examples,
        task_difficulty=config.task_difficulty,
        task_accuracy_metric=config.task_accuracy_metric,
        task_max_new_tokens=config.task_max_new_tokens,
        speed_metric=config.speed_metric,
        speed_batch_size=config.speed_batch_size,
        speed_seq_len=config.speed_seq_len,
        speed_repeats=max(config.speed_repeats, 5) if final else config.speed_repeats,
        time_forward=final,
        seed=config.seed,
    )


def run_phase2(config: EvoMergeConfig) -> dict[str, Any]:
    """Run Phase 2 end to end (resumable) and return a summary; see the module docstring.

    Under `accelerate launch` with several processes only the main process searches and writes; the others return
    `{"main_process": False}` once it has finished.
    """
    from accelerate import PartialState

    started = time.time()
    phase_dir = config.phase_dir
    champion_dir = phase_dir / "champion"
    state_path = phase_dir / STATE_FILE
    # On a machine without a GPU the processes talk over gloo (cpu=True), as Trainer's `use_cpu` does.
    state = PartialState(cpu=not torch.cuda.is_available())
    if not state.is_main_process:
        # The search and the writing run once, on the main process (a search is not data-parallel); the others wait.
        state.wait_for_everyone()
        return {"output_dir": str(champion_dir), "main_process": False}
    try:
        return _run_phase2_main(config, champion_dir, state_path, started)
    finally:
        state.wait_for_everyone()


def _finished_phase2(champion_dir: Path, state_path: Path) -> dict[str, Any]:
    """The summary of a finished Phase 2, read back from its files (for `--resume` after the champion was written)."""
    metrics = json.loads((champion_dir / "metrics.json").read_text())["metrics"]
    sections = json.loads((champion_dir / "card_sections.json").read_text())
    results = json.loads((champion_dir / "evomerge_results.json").read_text())
    return {"output_dir": str(champion_dir), "base_model": sections["base_model"],
            "state": EvolutionState.load(state_path), "comparison": sections["comparison"],
            "best_parent": results["best_parent"], "improvement_pct": sections["improvement_pct"], "metrics": metrics,
            "resumed_finished": True}  # fmt: skip


def _run_phase2_main(config: EvoMergeConfig, champion_dir: Path, state_path: Path, started: float) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from hub_cards import line_plot

    from .checkpointing import finished_output
    from .phase_output import save_phase_output

    phase_dir = config.phase_dir
    if finished_output(champion_dir) and config.resume and state_path.exists():
        logger.info("Phase 2 already finished at %s; nothing to resume.", champion_dir)
        return _finished_phase2(champion_dir, state_path)
    if champion_dir.exists() and not config.overwrite:
        raise FileExistsError(
            f"{champion_dir} already holds a finished Phase 2 champion. Fix: pass --overwrite to search again, or "
            "choose another output_dir."
        )
    if state_path.exists() and not (config.resume or config.overwrite):
        raise FileExistsError(
            f"{state_path} holds an unfinished search. Fix: pass --resume to continue it or --overwrite to restart."
        )
    if config.overwrite and state_path.exists():
        state_path.unlink()

    parents = config.parent_paths()
    for parent in parents:
        if not Path(parent).is_dir():
            raise FileNotFoundError(f"Parent checkpoint {parent} does not exist. Fix: run Phase 1 or pass --parents.")
        check_checkpoint_folder(parent, expect_forge=False)  # cut weights or a broken config.json: file, field, fix
    base = str(config.base_model or find_common_base(parents))
    logger.info("Phase 2: parents %s, common base %s", parents, base)
    checkpoints: dict[str, Checkpoint] = {path: load_checkpoint(path) for path in [*parents, base]}
    tokenizer = AutoTokenizer.from_pretrained(parents[0])
    parent_models = {Path(p).name: build_model(checkpoints[p]) for p in parents}
    n_layers = checkpoints[parents[0]].num_layers
    max_trm = max(int(checkpoints[p].config["trm_max_steps"]) for p in parents)
    space = GenomeSpace(len(parents), n_layers, config.max_path_length or 2 * n_layers, max(max_trm, 1))

    evaluator = MergeFitness(tokenizer, fitness_settings(config), split="validation", reference_models=parent_models)
    recipe_keys: dict[str, str] = {}

    def key_of(genome: Genome) -> str:
        genome_json = json.dumps(genome.to_dict(), sort_keys=True)
        if genome_json not in recipe_keys:
            recipe_keys[genome_json] = genome.recipe(parents, base).key()
        return recipe_keys[genome_json]

    def fitness(genome: Genome) -> dict[str, Any]:
        model = build_model(run_recipe(genome.recipe(parents, base), checkpoints))
        return evaluator.evaluate(model)

    tracker = LoopTracker(config.report_to, project=config.project, run_name=f"{Path(config.output_dir).name}-phase2",
                          config=asdict(config))  # fmt: skip

    def on_generation(state: EvolutionState) -> None:
        tracker.log({f"evomerge/{k}": float(v) for k, v in state.history[-1].items() if k != "generation"},
                    step=state.generation)  # fmt: skip
        pause_point(f"generation {state.generation}", run_name="phase2", step=state.generation,
                    max_steps=config.generations - 1)  # fmt: skip

    state = evolve(fitness, space, search_settings(config), key_of=key_of, state_path=state_path, resume=config.resume,
                   on_generation=on_generation)  # fmt: skip
    tracker.finish()
    write_atomic(phase_dir / RECORDS_FILE, "".join(json.dumps(r) + "\n" for r in state.records))
    plot_path = phase_dir / "plots" / "fitness.png"
    generations = [h["generation"] for h in state.history]
    validation_scores = {name: evaluator.score(raw)[0] for name, raw in evaluator.reference_raw.items()}
    best_parent_validation = max(validation_scores.values())
    line_plot(
        plot_path,
        {
            "best fitness": (generations, [h["best"] for h in state.history]),
            "mean fitness": (generations, [h["mean"] for h in state.history]),
            "diversity": (generations, [h["diversity"] for h in state.history]),
            "best parent (validation)": (generations, [best_parent_validation] * len(generations)),
        },
        title="EvoMerge: fitness and diversity per generation",
        xlabel="generation",
        ylabel="fitness / diversity",
    )

    # Held-out comparison: champion versus every parent on the test split, one evaluator, one process.
    champion_genome = Genome.from_dict(state.best["genome"])
    recipe = champion_genome.recipe(parents, base)
    kept_parent = None
    if config.keep_best_parent and state.best["fitness"] < best_parent_validation:
        # Decided on validation fitness, like the search; the test split below only reports.
        kept_parent = max(validation_scores, key=validation_scores.get)
        logger.warning("Phase 2: no merge beat the best parent %s on validation fitness (best merge %.4f < %.4f); "
                       "handing on %s unchanged (keep_best_parent).", kept_parent, state.best["fitness"],
                       best_parent_validation, kept_parent)  # fmt: skip
        champion = build_model(checkpoints[next(p for p in parents if Path(p).name == kept_parent)])
    else:
        champion = build_model(run_recipe(recipe, checkpoints))
    final = MergeFitness(tokenizer, fitness_settings(config, final=True), split="test", reference_models=parent_models)
    champion_result = final.evaluate(champion)
    parent_results = {}
    for name, raw in final.reference_raw.items():
        parent_fitness, parent_parts = final.score(raw)
        parent_results[name] = {"fitness": parent_fitness, "parts": parent_parts, "raw": raw}
    best_parent = max(parent_results, key=lambda n: parent_results[n]["fitness"])
    best_parent_fitness = parent_results[best_parent]["fitness"]
    improvement = 100.0 * (champion_result["fitness"] - best_parent_fitness) / best_parent_fitness

    def row(name: str, result: Mapping[str, Any]) -> dict[str, Any]:
        raw = result["raw"]
        return {"model": name, "fitness": result["fitness"], "perplexity": raw["perplexity"],
                "task_accuracy": raw["task_accuracy"], "task_likelihood": raw["task_likelihood"],
                "mflops_per_token": raw["flops_per_token"] / 1e6, "tokens_per_s": raw.get("tokens_per_s"),
                "parameter_mb": raw["parameter_bytes"] / 1e6}  # fmt: skip

    comparison = [row("champion", champion_result)] + [row(n, r) for n, r in parent_results.items()]
    metrics = {
        "test/fitness": champion_result["fitness"],
        "test/best_parent_fitness": best_parent_fitness,
        "test/improvement_over_best_parent_pct": improvement,
        **{f"test/{k}": v for k, v in champion_result["raw"].items()},
        **{f"test/part_{k}": v for k, v in champion_result["parts"].items()},
        "search/validation_fitness": state.best["fitness"],
        "search/kept_best_parent": float(kept_parent is not None),
        "search/best_parent_validation_fitness": best_parent_validation,
        "search/generations": state.generation + 1,
        "search/evaluations": state.evaluations,
        "search/cache_hits": state.cache_hits,
        "search/cache_hit_rate": state.cache_hits / max(state.evaluations + state.cache_hits, 1),
        "search/seconds": state.search_seconds,
    }
    eval_results = [
        {"dataset": "agent-forge/shakespeare", "split": "test", "metric": "perplexity",
         "value": champion_result["raw"]["perplexity"]},
        {"dataset": "agent-forge/tasks", "split": "test", "metric": "answer_token_probability",
         "value": champion_result["raw"]["task_likelihood"]},
    ]  # fmt: skip
    summary_text = (
        f"{state.generation + 1} generations of {config.population_size} candidates ({state.evaluations} evaluated, "
        f"{state.cache_hits} fitness-cache hits), stopped by {state.stopped}; elites {config.elites}, mutation rate "
        f"{config.mutation_rate}, diversity threshold {config.diversity_threshold}; search time "
        f"{state.search_seconds:.0f} s. Validation fitness of the champion: {state.best['fitness']:.4f}. Every "
        "candidate (genome, fitness parts, parents) is in `evolution.jsonl`."
    )
    sections = {
        "base_model": base,
        "fitness_formula": formula(config.fitness_weights),
        "speed_metric": "forward FLOPs per token on held-out text, counted by torch's FlopCounterMode"
        if config.speed_metric == "flops"
        else "wall-clock tokens/s timed in alternation with the fastest parent",
        "comparison": comparison,
        "improvement_pct": improvement,
        "search_summary": summary_text,
        "history": state.history,
        "recipe_yaml": recipe.to_yaml(),
        "kept_parent": kept_parent,
        "best_merge_validation_fitness": state.best["fitness"],
        "best_parent_validation_fitness": best_parent_validation,
    }

    def extras(folder: Path) -> None:
        (folder / "plots").mkdir(exist_ok=True)
        (folder / "plots" / "fitness.png").write_bytes(plot_path.read_bytes())
        # With a kept parent, the file is the best merge found (for reference), named so nobody mistakes it.
        (folder / ("best_merge_recipe.yaml" if kept_parent else "recipe.yaml")).write_text(recipe.to_yaml())
        (folder / RECORDS_FILE).write_text((phase_dir / RECORDS_FILE).read_text())
        comparison_payload = {"champion": champion_result, "parents": parent_results, "best_parent": best_parent}
        (folder / "evomerge_results.json").write_text(json.dumps(comparison_payload, indent=2))

    save_phase_output(
        champion_dir, model=champion, tokenizer=tokenizer, phase=2, phase_name="evomerge",
        config={"evomerge": asdict(config), "recipe": None if kept_parent else recipe.to_dict(),
                "best_merge_recipe": recipe.to_dict(), "kept_parent": kept_parent},
        inputs=parents, metrics=metrics,
        eval_results=eval_results, seed=config.seed, wall_time_s=time.time() - started,
        tags=["merge", "evolutionary-merge"], card_sections=sections, card_template="phase2_evomerge",
        model_name="forge-phase2-evomerge", write_extras=extras, overwrite=config.overwrite,
        push_to_hub=config.push_to_hub,
    )  # fmt: skip
    return {
        "output_dir": str(champion_dir),
        "base_model": base,
        "state": state,
        "comparison": comparison,
        "best_parent": best_parent,
        "kept_parent": kept_parent,
        "improvement_pct": improvement,
        "metrics": metrics,
    }


__all__ = [
    "EvolutionState",
    "FitnessSettings",
    "Genome",
    "GenomeSpace",
    "MergeFitness",
    "SearchSettings",
    "combo_genome",
    "crossover",
    "evolve",
    "find_common_base",
    "genome_distance",
    "initial_population",
    "mutate",
    "population_diversity",
    "random_genome",
    "run_phase2",
]
