"""Phase 2 (EvoMerge): genomes and their recipes, operators, elitism, search on a known optimum, plateau stop,
diversity re-injection, resume equivalence, the common-base discovery and the end-to-end phase output."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from test_merging import build_phase1_family  # the shared miniature Phase 1 (tests/trainers/test_merging.py)
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.evomerge import (
    DENSITY_RANGE,
    LAMBDA_RANGE,
    EvolutionState,
    Genome,
    GenomeSpace,
    SearchSettings,
    crossover,
    evolve,
    find_common_base,
    genome_distance,
    initial_population,
    mutate,
    population_diversity,
    random_genome,
    run_phase2,
)
from trainers.evomerge_config import EvoMergeConfig
from trainers.merging import MergeRecipe, RecipeError

SPACE = GenomeSpace(n_parents=3, n_layers=2, max_path_length=4)
PARENTS = ["p/reasoning", "p/memory", "p/speed"]


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    return build_phase1_family(tmp_path_factory.mktemp("phase1"), tiny_tokenizer)


def _quiet(**overrides) -> SearchSettings:
    return SearchSettings(show_progress=False, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Genomes and recipes.


def test_initial_population_is_the_eight_method_combinations_as_three_stage_recipes():
    population = initial_population(SPACE, 8, random.Random(0))
    combos = {(g.interp, g.task_method, g.layer_method) for g in population}
    assert combos == {
        (a, b, c) for a in ("linear", "slerp") for b in ("ties", "dare_ties") for c in ("franken", "dfs")
    }
    for genome in population:
        recipe = genome.recipe(PARENTS, "p/init")
        soup, task_vectors, layers = recipe.stages
        assert [soup.merge_method, task_vectors.merge_method, layers.merge_method] == [
            genome.interp, genome.task_method, genome.layer_method]  # fmt: skip
        assert [m.model for m in soup.models] == PARENTS
        assert task_vectors.base_model == "p/init" and [m.model for m in task_vectors.models] == ["interp", *PARENTS]
        assert layers.base_model == "task_vectors"  # non-layer tensors and config from the task-vector merge
        assert {s.model for s in layers.slices} <= {*PARENTS, "interp", "task_vectors"}
        assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe


def test_config_genes_become_config_overrides_of_the_merged_model(family):
    from trainers.merging import load_checkpoint, run_recipe

    parents = [str(family[name]) for name in ("reasoning", "memory", "speed")]
    checkpoints = {p: load_checkpoint(p) for p in [*parents, str(family["init"])]}
    genome = initial_population(SPACE, 8, random.Random(0))[1]
    ruled = run_recipe(genome.recipe(parents, str(family["init"])), checkpoints).config
    assert ruled["trm_max_steps"] == 3  # the rule: weighted mean of 4, 3, 2 with equal weights
    evolved = dataclasses.replace(genome, trm_max_steps=1, act_threshold=0.25).recipe(parents, str(family["init"]))
    assert evolved.config_overrides == {"trm_max_steps": 1, "act_threshold": 0.25}
    config = run_recipe(evolved, checkpoints).config
    assert config["trm_max_steps"] == 1 and config["act_threshold"] == 0.25 and config["trm_step_weights"] is None


def test_the_cache_key_ignores_genes_a_candidate_does_not_express():
    genome = initial_population(SPACE, 8, random.Random(0))[0]  # linear -> ties -> franken
    key = genome.recipe(PARENTS, "B").key()
    unexpressed = dataclasses.replace(genome, dfs_path=((0, 1, 0.7),), seed=genome.seed + 1)  # DFS genes, DARE seed
    assert unexpressed.recipe(PARENTS, "B").key() == key
    assert dataclasses.replace(genome, density=0.9).recipe(PARENTS, "B").key() != key
    assert dataclasses.replace(genome, layer_method="dfs").recipe(PARENTS, "B").key() != key


def test_mutation_and_crossover_stay_inside_the_genome_space():
    rng = random.Random(0)
    genomes = [random_genome(SPACE, rng) for _ in range(20)]
    changed = 0
    for step in range(300):
        a, b = rng.choice(genomes), rng.choice(genomes)
        child = mutate(a, SPACE, rng, 0.5, 0.3) if step % 2 else crossover(a, b, SPACE, rng)
        changed += child != a
        assert min(child.interp_weights) >= 0 and sum(child.interp_weights) > 0
        assert min(child.task_weights) >= 0 and sum(child.task_weights) > 0
        assert DENSITY_RANGE[0] <= child.density <= DENSITY_RANGE[1]
        assert LAMBDA_RANGE[0] <= child.scale <= LAMBDA_RANGE[1]
        assert len(child.franken_sources) == SPACE.n_layers
        assert all(0 <= s < SPACE.pool_size for s in child.franken_sources)
        assert 1 <= len(child.dfs_path) <= SPACE.max_path_length
        assert all(0 <= p < SPACE.pool_size and 0 <= layer < SPACE.n_layers for p, layer, _ in child.dfs_path)
        assert child.trm_max_steps is None or 1 <= child.trm_max_steps <= SPACE.max_trm_steps
        assert child.act_threshold is None or 0.1 <= child.act_threshold <= 0.9
        child.recipe(PARENTS, "B")  # always a valid recipe
        genomes.append(child)
    assert changed > 250


def test_diversity_is_zero_for_clones_and_grows_with_differences():
    genome = initial_population(SPACE, 8, random.Random(0))[0]
    assert population_diversity([genome] * 5) == 0.0
    assert genome_distance(genome, genome) == 0.0
    other = dataclasses.replace(genome, interp="slerp", task_method="dare_ties", layer_method="dfs")
    assert genome_distance(genome, other) == 0.75  # three stages of four components differ completely
    assert genome_distance(other, dataclasses.replace(other, trm_max_steps=2, act_threshold=0.3)) == 0.25
    assert 0 < population_diversity(initial_population(SPACE, 8, random.Random(0))) < 1


# ---------------------------------------------------------------------------------------------------------------
# The search, on synthetic fitness functions.

TARGET = Genome(
    interp="slerp", interp_weights=(0.2, 0.3, 0.5), task_method="dare_ties", task_weights=(1.0, 0.0, 1.0, 0.5),
    density=0.7, scale=1.2, seed=0, layer_method="franken", franken_sources=(4, 1), dfs_path=((4, 0, 1.0),),
)  # fmt: skip


def _synthetic(genome: Genome) -> dict:
    """Known optimum: fitness 1 exactly at TARGET's expressed genes, lower with every step away from it."""
    return {"fitness": 1.0 - genome_distance(genome, TARGET)}


def test_the_search_finds_a_known_optimum_and_elites_never_lose_fitness():
    state = evolve(_synthetic, SPACE, _quiet(generations=50, patience=50))
    best = Genome.from_dict(state.best["genome"])
    assert (best.interp, best.task_method, best.layer_method) == ("slerp", "dare_ties", "franken")
    assert best.franken_sources == TARGET.franken_sources
    assert state.best["fitness"] > 0.95  # numeric genes approach the optimum by Gaussian steps
    assert abs(best.density - TARGET.density) < 0.05
    generation_best = [h["generation_best"] for h in state.history]
    assert all(b >= a for a, b in zip(generation_best, generation_best[1:], strict=False))
    first_generation = initial_population(SPACE, 8, random.Random(0))
    assert state.best["fitness"] > max(_synthetic(g)["fitness"] for g in first_generation) + 0.2
    elites = [r for r in state.records if r["origin"] == "elite"]
    assert elites and all(r["cached"] for r in elites)  # elites survive unchanged: their fitness comes from the cache
    assert state.cache_hits >= 2 * (len(state.history) - 1)


def test_the_search_stops_on_a_plateau():
    state = evolve(lambda genome: {"fitness": 0.5}, SPACE, _quiet(generations=50, patience=5))
    assert state.stopped == "plateau" and state.generation == 5  # generation 0, then 5 without progress


def test_a_collapsed_population_gets_fresh_genomes():
    state = evolve(_synthetic, SPACE, _quiet(generations=3, patience=10, diversity_threshold=1.0))
    reinjected = [r for r in state.records if r["origin"] == "reinjection"]
    assert len(reinjected) == 2 * 3  # generations 1 and 2, half of the 6 non-elite slots each
    assert all(h["reinjected"] for h in state.history[1:])
    calm = evolve(_synthetic, SPACE, _quiet(generations=3, patience=10, diversity_threshold=0.0))
    assert not any(r["origin"] == "reinjection" for r in calm.records)


def _comparable(state: EvolutionState) -> dict:
    records = [{k: v for k, v in r.items() if k != "cached"} for r in state.records]
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in state.history]
    return {"records": records, "history": history, "best": state.best, "stopped": state.stopped}


def test_resume_from_the_last_finished_generation_matches_an_uninterrupted_run(tmp_path):
    settings = _quiet(generations=8, patience=50)
    uninterrupted = evolve(_synthetic, SPACE, settings, state_path=tmp_path / "a.json")
    calls = {"n": 0}

    def crashing(genome):
        calls["n"] += 1
        if calls["n"] > 8 + 6 * 3 + 2:  # in the middle of generation 4
            raise KeyboardInterrupt
        return _synthetic(genome)

    with pytest.raises(KeyboardInterrupt):
        evolve(crashing, SPACE, settings, state_path=tmp_path / "b.json")
    saved = EvolutionState.load(tmp_path / "b.json")
    assert saved.generation == 3 and not saved.finished  # the last finished generation was written
    resumed = evolve(_synthetic, SPACE, settings, state_path=tmp_path / "b.json", resume=True)
    assert _comparable(resumed) == _comparable(uninterrupted)
    with pytest.raises(ValueError, match=r"different settings \(\['seed'\]\)"):
        evolve(_synthetic, SPACE, dataclasses.replace(settings, seed=1), state_path=tmp_path / "b.json", resume=True)


# ---------------------------------------------------------------------------------------------------------------
# Phase 2 on a miniature Phase 1.


def test_the_common_base_is_found_in_the_lineage(family, tmp_path, tiny_tokenizer):
    parents = [family["reasoning"], family["memory"], family["speed"]]
    assert find_common_base(parents).resolve() == family["init"].resolve()
    strangers = build_phase1_family(tmp_path / "other", tiny_tokenizer, init_seed=5, steps=1)
    with pytest.raises(ValueError, match="share no ancestor"):
        find_common_base([family["reasoning"], strangers["speed"]])


def _phase2_config(output_dir: Path, family: dict[str, Path], **overrides) -> EvoMergeConfig:
    values = dict(
        output_dir=str(output_dir), phase1_dir=str(family["init"].parent), generations=2, eval_tokens=256,
        eval_seq_len=128, task_examples=4, final_eval_tokens=512, final_task_examples=4, speed_repeats=1,
        show_progress=False,
    )  # fmt: skip
    values.update(overrides)
    return EvoMergeConfig(**values)


def test_phase2_writes_a_loadable_champion_with_its_recipe_history_and_plot(family, tmp_path):
    summary = run_phase2(_phase2_config(tmp_path / "run", family))
    phase_dir = tmp_path / "run" / "phase2"
    champion = phase_dir / "champion"
    model = AutoModelForCausalLM.from_pretrained(champion).eval()
    tokenizer = AutoTokenizer.from_pretrained(champion)
    ids = tokenizer("ROMEO. ", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape[1] == ids.shape[1] + 4
    records = [json.loads(line) for line in (phase_dir / "evolution.jsonl").read_text().splitlines()]
    assert len(records) == 16 and {"genome", "fitness", "parts", "parents", "origin", "key"} <= set(records[0])
    assert {r["origin"] for r in records[:8]} == {"initial"} and records[8]["origin"] == "elite"
    assert (phase_dir / "plots" / "fitness.png").stat().st_size > 0
    lineage = json.loads((champion / "forge_lineage.json").read_text())
    assert lineage["phase"] == 2 and lineage["phase_name"] == "evomerge"
    assert [Path(i["id"]).name for i in lineage["inputs"]] == ["reasoning", "memory", "speed"]
    recipe = MergeRecipe.from_yaml((champion / "recipe.yaml").read_text())
    assert recipe == MergeRecipe.from_dict(lineage["config"]["recipe"])
    card = (champion / "README.md").read_text()
    assert recipe.to_yaml().strip() in card and "| generation | best fitness |" in card and "plots/fitness.png" in card
    metrics = json.loads((champion / "metrics.json").read_text())["metrics"]
    assert metrics["test/improvement_over_best_parent_pct"] == pytest.approx(summary["improvement_pct"])
    assert summary["base_model"] == str(family["init"])
    with pytest.raises(FileExistsError, match="already holds a finished Phase 2 champion"):
        run_phase2(_phase2_config(tmp_path / "run", family))


@pytest.mark.parametrize("keep", [True, False])
def test_a_merge_that_loses_to_every_parent_is_not_handed_on(family, tmp_path, monkeypatch, keep):
    """Merges made to lose (their weights scrambled): with `keep_best_parent` the folder holds the validation-best
    parent bit for bit and says so; without it, the (worse) best merge is handed on as before."""
    from safetensors.torch import load_file

    import trainers.evomerge as evomerge

    real_run_recipe = evomerge.run_recipe

    def scrambled(recipe, checkpoints):
        merged = real_run_recipe(recipe, checkpoints)
        generator = torch.Generator().manual_seed(0)
        noise = {
            k: torch.randn(t.shape, generator=generator) * 0.5 if t.is_floating_point() else t
            for k, t in merged.state_dict.items()
        }  # fmt: skip  (new tensors: merges may share the parents')
        return dataclasses.replace(merged, state_dict=noise)

    monkeypatch.setattr(evomerge, "run_recipe", scrambled)
    summary = run_phase2(_phase2_config(tmp_path / "run", family, keep_best_parent=keep, generations=1))
    champion = tmp_path / "run" / "phase2" / "champion"
    metrics = json.loads((champion / "metrics.json").read_text())["metrics"]
    assert metrics["search/validation_fitness"] < metrics["search/best_parent_validation_fitness"]
    weights = load_file(champion / "model.safetensors")
    if keep:
        assert summary["kept_parent"] in {"reasoning", "memory", "speed"}
        parent = load_file(family[summary["kept_parent"]] / "model.safetensors")
        assert weights.keys() == parent.keys() and all(torch.equal(weights[k], parent[k]) for k in parent)
        assert metrics["search/kept_best_parent"] == 1.0
        assert (champion / "best_merge_recipe.yaml").exists() and not (champion / "recipe.yaml").exists()
        assert "No merge beat the best parent" in (champion / "README.md").read_text()
    else:
        assert summary["kept_parent"] is None and metrics["search/kept_best_parent"] == 0.0
        assert (champion / "recipe.yaml").exists()
        assert "No merge beat the best parent" not in (champion / "README.md").read_text()
        for name in ("reasoning", "memory", "speed"):
            parent = load_file(family[name] / "model.safetensors")
            assert not all(torch.equal(weights[k], parent[k]) for k in parent if k in weights)


def test_fitness_is_deterministic_and_sees_a_longer_layer_path(family, tiny_tokenizer):
    from trainers.evomerge import FitnessSettings, MergeFitness
    from trainers.merging import build_model, load_checkpoint, run_recipe

    checkpoints = {name: load_checkpoint(family[name]) for name in ("reasoning", "memory", "speed")}
    parents = {name: build_model(c) for name, c in checkpoints.items()}
    weights = dict(EvoMergeConfig().fitness_weights)
    settings = FitnessSettings(weights=weights, eval_tokens=256, eval_seq_len=128, task_examples=4)
    fitness = MergeFitness(tiny_tokenizer, settings, reference_models=parents)
    assert fitness.evaluate(parents["memory"]) == fitness.evaluate(parents["memory"])  # cacheable: no timing noise
    for name, raw in fitness.reference_raw.items():  # relative to the best parent per metric: none beats it
        _, parts = fitness.score(raw)
        assert all(value <= 1.0 + 1e-9 for value in parts.values()), (name, parts)
    speed = str(family["speed"])
    deeper = {"merge_method": "dfs", "slices": [{"sources": [{"model": speed, "layer_range": [0, 2]}]},
                                                {"sources": [{"model": speed, "layer_range": [1, 2]}]}]}  # fmt: skip
    model = build_model(run_recipe(MergeRecipe.from_dict(deeper), {speed: checkpoints["speed"]}))
    result = fitness.evaluate(model)
    assert result["raw"]["flops_per_token"] > fitness.reference_raw["speed"]["flops_per_token"]
    assert result["parts"]["memory"] < 1.0  # one more layer of parameters


def test_exact_match_task_accuracy_scores_greedy_generations_as_the_evaluation_does(
    family, tiny_tokenizer, monkeypatch
):
    import evaluation.harness as harness
    from trainers.evomerge import FitnessSettings, MergeFitness
    from trainers.merging import build_model, load_checkpoint

    model = build_model(load_checkpoint(family["memory"]))
    weights = dict(EvoMergeConfig().fitness_weights)
    settings = FitnessSettings(weights=weights, eval_tokens=256, eval_seq_len=128, task_families=("kv_recall",),
                               task_examples=4, task_accuracy_metric="exact_match")  # fmt: skip
    fitness = MergeFitness(tiny_tokenizer, settings)
    task, docs = fitness.tasks["kv_recall"]
    answers = {doc.prompt: doc.answer for doc in docs}
    right = {docs[0].prompt, docs[2].prompt, docs[3].prompt}
    calls = []

    def scripted(model, tokenizer, prompts, **kwargs):  # three of four generations carry the right number
        calls.append(kwargs)
        return [[f" {answers[p]}\nQuestion" if p in right else " 7"] for p in prompts]

    monkeypatch.setattr(harness, "generate_completions", scripted)
    assert fitness.measure(model)["task_accuracy"] == 0.75
    assert calls[0]["max_new_tokens"] == 48 and calls[0]["stop_sequences"] == task.stop_sequences
    # The default metric never generates: it is the teacher-forced greedy match of the whole target.
    calls.clear()
    greedy = MergeFitness(tiny_tokenizer, dataclasses.replace(settings, task_accuracy_metric="greedy_target"))
    assert greedy.measure(model)["task_accuracy"] < 0.75 and not calls
    with pytest.raises(ValueError, match="task_accuracy_metric"):
        EvoMergeConfig(task_accuracy_metric="f1")


def test_phase2_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"EvoMergeConfig\.fitness_weights has unknown parts \['sped'\]"):
        EvoMergeConfig(fitness_weights={"sped": 1.0})
    with pytest.raises(ValueError, match=r"EvoMergeConfig\.elites=8 must lie in \[0, population_size=8\)"):
        EvoMergeConfig(elites=8)
    with pytest.raises(ValueError, match=r"EvoMergeConfig\.speed_metric is 'fast'"):
        EvoMergeConfig(speed_metric="fast")
    with pytest.raises(ValueError, match=r"EvoMergeConfig\.task_families has unknown family 'math'"):
        EvoMergeConfig(task_families=["math"])
    assert EvoMergeConfig(fitness_weights='{"perplexity": 1}').fitness_weights["speed"] == 0.0


@pytest.mark.slow
def test_phase2_resumed_after_a_crash_equals_an_uninterrupted_run(family, tmp_path, monkeypatch):
    """Real merges and fitness (deterministic: FLOP-counted speed): crash in generation 2, then resume."""
    from trainers import evomerge

    overrides = {"generations": 4}  # the default speed metric (FLOPs per token) is deterministic too
    run_phase2(_phase2_config(tmp_path / "a", family, **overrides))
    evaluate = evomerge.MergeFitness.evaluate
    calls = {"n": 0}

    def crashing(self, model):
        calls["n"] += 1
        if calls["n"] == 8 + 6 + 3 + 1:  # the final comparison builds its own evaluator; crash mid-generation 2
            raise KeyboardInterrupt
        return evaluate(self, model)

    monkeypatch.setattr(evomerge.MergeFitness, "evaluate", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_phase2(_phase2_config(tmp_path / "b", family, **overrides))
    monkeypatch.setattr(evomerge.MergeFitness, "evaluate", evaluate)
    with pytest.raises(FileExistsError, match="unfinished search"):
        run_phase2(_phase2_config(tmp_path / "b", family, **overrides))
    run_phase2(_phase2_config(tmp_path / "b", family, resume=True, **overrides))

    def outcome(run: str) -> list:
        lines = (tmp_path / run / "phase2" / "evolution.jsonl").read_text().splitlines()
        return [(r["id"], r["key"], round(r["fitness"], 9)) for r in map(json.loads, lines)]

    assert outcome("a") == outcome("b")
    recipe = lambda run: (tmp_path / run / "phase2" / "champion" / "recipe.yaml").read_text()  # noqa: E731
    assert recipe("a") == recipe("b")


def test_recipe_errors_surface_for_an_invalid_genome():
    genome = dataclasses.replace(initial_population(SPACE, 8, random.Random(0))[0], density=1.7)
    with pytest.raises(RecipeError, match=r"stages\[1\]\.parameters\.density: must lie in"):
        genome.recipe(PARENTS, "B")
