"""Merge methods (trainers.merging): each method's math, tied and non-layer tensors, config rules, compatibility and
ancestry checks, recipes (round trip and one error per bad field) and Hub folders that load and generate."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator
from transformers.masking_utils import create_recurrent_attention_mask, create_sliding_window_causal_mask

from modeling_forge import ForgeConfig, ForgeForCausalLM
from trainers.merging import (
    MERGE_METHODS,
    Checkpoint,
    MergeRecipe,
    RecipeError,
    TaskArithmeticMerge,
    build_model,
    check_compatible,
    get_merge_method,
    load_checkpoint,
    merged_model,
    resolve_param,
    run_recipe,
    slerp,
)
from trainers.phase_output import save_phase_output

SPECIALISATIONS = {
    "reasoning": ({"trm_max_steps": 4, "act_threshold": 0.7, "trm_step_weights": None}, 1),
    # the neural memory forgets half as fast (Phase 1's rule); the threshold is Phase 1's memory specialisation's
    "memory": ({"memory_forget_scale": 0.5, "act_threshold": 0.5}, 2),
    "speed": ({"trm_max_steps": 2, "act_threshold": 0.3, "trm_step_weights": None}, 3),
}


def build_phase1_family(root: Path, tokenizer, *, init_seed: int = 0, steps: int = 4) -> dict[str, Path]:
    """A miniature Phase 1: one saved init and three children trained a few Trainer steps from it with the
    specialisations' config changes, each saved through `save_phase_output` (so their lineage names the init)."""
    from evaluation.corpus import corpus_texts
    from trainers.data import pack_texts

    config = ForgeConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, sliding_window=16, memory_chunk_size=8, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(init_seed)
    paths = {"init": root / "init"}
    save_phase_output(paths["init"], model=ForgeForCausalLM(config), tokenizer=tokenizer, phase=1,
                      phase_name="cognate-init", config={"init_seed": init_seed}, seed=init_seed)  # fmt: skip
    data = pack_texts(corpus_texts("train", max_chars=40_000), tokenizer, 64)
    for name, (overrides, seed) in SPECIALISATIONS.items():
        model = ForgeForCausalLM.from_pretrained(paths["init"], **overrides)
        args = TrainingArguments(
            output_dir=str(root / f".{name}-trainer"), max_steps=steps, per_device_train_batch_size=8,
            learning_rate=5e-3, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed,
            data_seed=seed, logging_strategy="no",
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
        paths[name] = root / name
        save_phase_output(paths[name], model=model, tokenizer=tokenizer, phase=1, phase_name="cognate",
                          config={"specialization": name}, inputs=[paths["init"]], seed=seed)  # fmt: skip
    return paths


@pytest.fixture(scope="session")
def family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    return build_phase1_family(tmp_path_factory.mktemp("phase1"), tiny_tokenizer)


@pytest.fixture(scope="session")
def loaded(family) -> dict[str, Checkpoint]:
    return {name: load_checkpoint(path) for name, path in family.items()}


def _refs(loaded: dict[str, Checkpoint]) -> dict[str, Checkpoint]:
    """The loaded checkpoints keyed by the names recipes use here."""
    return dict(loaded)


def _toy(name: str, tensors: dict[str, torch.Tensor], **config) -> Checkpoint:
    values = {"model_type": "forge", "num_hidden_layers": 2, "vocab_size": 4, "tie_word_embeddings": True}
    values.update(config)
    return Checkpoint(name=name, state_dict=tensors, config=values)


# ---------------------------------------------------------------------------------------------------------------
# Registry and parameter values.


def test_registry_holds_every_method_and_rejects_unknown_names():
    assert {"linear", "slerp", "ties", "dare_ties", "dare_linear", "task_arithmetic", "franken", "dfs"} <= set(
        MERGE_METHODS
    )
    ties = get_merge_method("ties")
    assert isinstance(ties, TaskArithmeticMerge) and ties.sparsify == "magnitude" and ties.sign_consensus
    dare = get_merge_method("dare_ties")
    assert isinstance(dare, TaskArithmeticMerge) and dare.sparsify == "random" and dare.sign_consensus
    with pytest.raises(ValueError, match=r"Unknown merge method 'tie'\. Did you mean 'ties'\?.*Known methods: "):
        get_merge_method("tie")


def test_parameter_values_scalar_gradient_and_filters():
    assert resolve_param(0.3, "model.layers.1.mlp.up_proj.weight", 3) == 0.3
    gradient = [0.0, 1.0]
    assert resolve_param(gradient, "model.layers.0.mlp.up_proj.weight", 3) == 0.0
    assert resolve_param(gradient, "model.layers.1.mlp.up_proj.weight", 3) == pytest.approx(0.5)
    assert resolve_param(gradient, "model.layers.2.mlp.up_proj.weight", 3) == 1.0
    assert resolve_param(gradient, "model.embed_tokens.weight", 3) == 0.0  # input side: first value
    assert resolve_param(gradient, "model.recursion.act_head.bias", 3) == 1.0  # output side: last value
    filters = [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.1, 0.3]}, {"value": 0.5}]
    assert resolve_param(filters, "model.layers.0.self_attn.q_proj.weight", 2) == 0.7
    assert resolve_param(filters, "model.layers.1.mlp.up_proj.weight", 2) == pytest.approx(0.3)
    assert resolve_param(filters, "model.norm.weight", 2) == 0.5


# ---------------------------------------------------------------------------------------------------------------
# The math of each method, on small tensors.


def test_linear_is_the_weighted_mean_and_honours_normalize():
    a = _toy("a", {"model.layers.0.w": torch.tensor([1.0, 2.0]), "model.norm.weight": torch.tensor([1.0])})
    b = _toy("b", {"model.layers.0.w": torch.tensor([3.0, 6.0]), "model.norm.weight": torch.tensor([5.0])})
    recipe = MergeRecipe.from_dict(
        {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                              {"model": "b", "parameters": {"weight": 3.0}}]}
    )  # fmt: skip
    merged = run_recipe(recipe, {"a": a, "b": b}).state_dict
    assert torch.allclose(merged["model.layers.0.w"], torch.tensor([2.5, 5.0]))  # 0.25 a + 0.75 b
    assert torch.allclose(merged["model.norm.weight"], torch.tensor([4.0]))
    raw = MergeRecipe.from_dict({**recipe.to_dict(), "parameters": {"normalize": False}})
    assert torch.allclose(run_recipe(raw, {"a": a, "b": b}).state_dict["model.layers.0.w"], torch.tensor([10.0, 20.0]))


def test_slerp_endpoints_midpoint_norm_and_parallel_fallback():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    assert torch.allclose(slerp(0.0, a, b), a) and torch.allclose(slerp(1.0, a, b), b)
    middle = slerp(0.5, a, b)
    assert middle.norm() == pytest.approx(3.0, rel=1e-6)  # linear interpolation would give 3/sqrt(2)
    assert torch.allclose(middle, (a + b) / math.sqrt(2.0), atol=1e-6)
    assert torch.allclose(slerp(0.25, a, 2 * a), 1.25 * a)  # parallel: linear interpolation
    ca, cb = _toy("a", {"model.layers.0.w": a}), _toy("b", {"model.layers.0.w": b})
    recipe = MergeRecipe.from_dict(
        {"merge_method": "slerp", "base_model": "a", "models": ["b"], "parameters": {"t": 0.5}}
    )
    assert torch.allclose(run_recipe(recipe, {"a": ca, "b": cb}).state_dict["model.layers.0.w"], middle)


def test_ties_trims_elects_signs_and_averages_agreeing_entries():
    base = torch.zeros(4)
    tau = [
        torch.tensor([4.0, -1.0, 0.5, 2.0]),
        torch.tensor([3.0, 2.5, -3.0, -0.1]),
        torch.tensor([-3.5, 3.0, -2.0, 0.2]),
    ]
    # density 0.5 keeps the 2 largest magnitudes of each task vector:
    #   tau1 -> [4, 0, 0, 2]; tau2 -> [3, 0, -3, 0]; tau3 -> [-3.5, 3, 0, 0]
    # elected sign (sign of the sum): [+, +, -, +]; mean of the kept entries that agree with it (the -3.5 loses):
    expected = torch.tensor([(4 + 3) / 2, 3.0, -3.0, 2.0])
    checkpoints = {"base": _toy("base", {"model.layers.0.w": base})}
    for i, t in enumerate(tau):
        checkpoints[f"m{i}"] = _toy(f"m{i}", {"model.layers.0.w": base + t})
    recipe = MergeRecipe.from_dict(
        {"merge_method": "ties", "base_model": "base", "models": ["m0", "m1", "m2"], "parameters": {"density": 0.5}}
    )
    assert torch.allclose(run_recipe(recipe, checkpoints).state_dict["model.layers.0.w"], expected)
    scaled = MergeRecipe.from_dict({**recipe.to_dict(), "parameters": {"density": 0.5, "lambda": 2.0}})
    assert torch.allclose(run_recipe(scaled, checkpoints).state_dict["model.layers.0.w"], 2 * expected)


def test_dare_drop_and_rescale_preserves_the_expectation_and_is_seeded():
    torch.manual_seed(0)
    tau = torch.randn(4000)
    checkpoints = {"base": _toy("base", {"model.layers.0.w": torch.zeros(4000)}),
                   "m": _toy("m", {"model.layers.0.w": tau})}  # fmt: skip

    def dare(seed: int) -> torch.Tensor:
        recipe = {"merge_method": "dare_linear", "base_model": "base", "models": ["m"],
                  "parameters": {"density": 0.25, "seed": seed}}  # fmt: skip
        return run_recipe(MergeRecipe.from_dict(recipe), checkpoints).state_dict["model.layers.0.w"]

    one = dare(0)
    kept = one != 0
    assert kept.float().mean().item() == pytest.approx(0.25, abs=0.03)  # drops 75%
    assert torch.allclose(one[kept], tau[kept] / 0.25)  # survivors rescaled by 1/density
    assert torch.equal(one, dare(0)) and not torch.equal(one, dare(1))  # seeded, deterministic
    mean = torch.stack([dare(seed) for seed in range(200)]).mean(0)
    # E[dare(tau)] = tau: the average over seeds regresses on tau with slope 1 and small residuals (one draw's
    # per-entry standard deviation is sqrt(1/density - 1)|tau|, so 200 draws leave about 0.12|tau|)
    assert float((mean * tau).sum() / (tau * tau).sum()) == pytest.approx(1.0, abs=0.02)
    assert (mean - tau).abs().mean() < 0.12


def test_franken_takes_each_layer_from_the_chosen_parent(loaded, family):
    refs = {k: str(v) for k, v in family.items()}
    recipe = MergeRecipe.from_dict({"merge_method": "franken", "base_model": refs["speed"], "slices": [
        {"sources": [{"model": refs["memory"], "layer_range": [0, 1]}]},
        {"sources": [{"model": refs["reasoning"], "layer_range": [1, 2]}]},
    ]})  # fmt: skip
    by_path = {str(family[name]): ck for name, ck in loaded.items()}
    merged = run_recipe(recipe, by_path)
    for name, tensor in merged.state_dict.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(tensor, loaded["memory"].state_dict[name]), name
        elif name.startswith("model.layers.1."):
            assert torch.equal(tensor, loaded["reasoning"].state_dict[name]), name
        else:  # embedding, final norm, TRM refiner, ACT head: from the base
            assert torch.equal(tensor, loaded["speed"].state_dict[name]), name
    assert merged.config["trm_max_steps"] == 2 and merged.config["act_threshold"] == 0.3  # the base's settings
    with pytest.raises(RecipeError, match=r"slices\[1\]\.sources\[0\]\.layer_range: franken keeps layer positions"):
        MergeRecipe.from_dict({"merge_method": "franken", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 1]}]}, {"sources": [{"model": "a", "layer_range": [0, 1]}]},
        ]})  # fmt: skip


def _run_layers_by_hand(model, input_ids, path):
    """The backbone of `model` run with an explicit layer path [(layer index, input scale)], then its head."""
    m = model.model
    hidden = m.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1])[None]
    kwargs = {"config": m.config, "inputs_embeds": hidden, "attention_mask": None, "past_key_values": None,
              "position_ids": positions}  # fmt: skip
    mask, memory_mask = create_sliding_window_causal_mask(**kwargs), create_recurrent_attention_mask(**kwargs)
    position_embeddings = m.rotary_emb(hidden, positions)
    for layer, scale in path:
        hidden = m.layers[layer](hidden * scale, attention_mask=mask, memory_mask=memory_mask,
                                 position_embeddings=position_embeddings)[0]  # fmt: skip
    recursion = m.recursion(m.norm(hidden), position_embeddings, mask, None, keep_steps=False, halting=False)
    return model.lm_head(recursion.last_hidden_state)


@torch.no_grad()
def test_dfs_runs_the_layer_path_its_genome_names(loaded, family):
    speed_path = str(family["speed"])
    slices = [
        {"sources": [{"model": speed_path, "layer_range": [0, 1]}]},
        {"sources": [{"model": speed_path, "layer_range": [0, 2]}]},  # layer 0 again, then layer 1
        {"sources": [{"model": speed_path, "layer_range": [1, 2], "scale": 0.5}]},  # layer 1 again, input halved
    ]
    checkpoint = run_recipe(
        MergeRecipe.from_dict({"merge_method": "dfs", "slices": slices}), {speed_path: loaded["speed"]}
    )
    assert checkpoint.config["num_hidden_layers"] == 4
    assert checkpoint.config["layer_input_scales"] == [1.0, 1.0, 1.0, 0.5]
    merged, speed = build_model(checkpoint), build_model(loaded["speed"])
    input_ids = torch.randint(3, 500, (2, 12))
    expected = _run_layers_by_hand(speed, input_ids, [(0, 1.0), (0, 1.0), (1, 1.0), (1, 0.5)])
    assert torch.allclose(merged(input_ids, act_halting=False).logits, expected, atol=1e-5)
    # the identity path reproduces the model exactly; a scaled path differs
    identity = run_recipe(MergeRecipe.from_dict({"merge_method": "dfs", "slices": slices[1:2]}),
                          {speed_path: loaded["speed"]})  # fmt: skip
    assert identity.config["layer_input_scales"] is None
    assert torch.allclose(build_model(identity)(input_ids).logits, speed(input_ids).logits)
    assert not torch.allclose(
        expected, _run_layers_by_hand(speed, input_ids, [(0, 1.0), (0, 1.0), (1, 1.0), (1, 1.0)])
    )


# ---------------------------------------------------------------------------------------------------------------
# Tied weights, non-layer tensors, config fields.


def test_tied_head_follows_the_merged_embedding_and_non_layer_tensors_are_merged(loaded, family):
    refs = {name: str(path) for name, path in family.items()}
    by_path = {refs[name]: ck for name, ck in loaded.items()}
    assert "lm_head.weight" not in loaded["speed"].state_dict  # the tied copy is never merged on its own
    recipe = MergeRecipe.from_dict(
        {"merge_method": "linear", "models": [refs["reasoning"], refs["memory"], refs["speed"]]}
    )
    checkpoint = run_recipe(recipe, by_path)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.recursion.act_head.bias",
                 "model.recursion.refiner.z_init.weight", "model.layers.1.memory.k_proj.weight",
                 "model.layers.1.memory.conv_weight", "model.layers.0.memory.dt_bias",
                 "model.layers.0.gate.fc1.bias"):  # fmt: skip
        mean = sum(loaded[n].state_dict[name] for n in ("reasoning", "memory", "speed")) / 3
        assert torch.allclose(checkpoint.state_dict[name], mean, atol=1e-6), name
    model = build_model(checkpoint)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(model.lm_head.weight, checkpoint.state_dict["model.embed_tokens.weight"])
    ties = MergeRecipe.from_dict({"merge_method": "ties", "base_model": refs["init"], "models": [refs["speed"]],
                                  "parameters": {"density": 1.0}})  # fmt: skip
    merged = run_recipe(ties, by_path).state_dict
    for name in ("model.recursion.act_head.weight", "model.embed_tokens.weight"):  # one model, no trim: itself
        assert torch.allclose(merged[name], loaded["speed"].state_dict[name], atol=1e-6)


def test_differing_config_fields_follow_the_documented_rule(loaded, family):
    refs = {name: str(path) for name, path in family.items()}
    by_path = {refs[name]: ck for name, ck in loaded.items()}
    recipe = MergeRecipe.from_dict({"merge_method": "linear", "models": [
        {"model": refs["reasoning"], "parameters": {"weight": 1.0}},  # trm 4, act 0.7, forget scale 1
        {"model": refs["memory"], "parameters": {"weight": 1.0}},  # trm 3, act 0.5, forget scale 0.5
        {"model": refs["speed"], "parameters": {"weight": 2.0}},  # trm 2, act 0.3, forget scale 1
    ]})  # fmt: skip
    config = run_recipe(recipe, by_path).config
    assert config["trm_max_steps"] == round((4 + 3 + 2 * 2) / 4)  # 2.75 -> 3
    assert config["act_threshold"] == pytest.approx((0.7 + 0.5 + 2 * 0.3) / 4)
    assert config["memory_forget_scale"] == pytest.approx((1.0 + 0.5 + 2 * 1.0) / 4)
    model = build_model(run_recipe(recipe, by_path))
    assert len(model.config.trm_step_weights) == model.config.trm_max_steps + 1  # re-derived for the new depth


# ---------------------------------------------------------------------------------------------------------------
# Compatibility and ancestry.


def test_incompatible_parents_fail_naming_the_mismatch(loaded, tmp_path):
    speed = loaded["speed"]
    other_type = Checkpoint("llama", speed.state_dict, {**speed.config, "model_type": "llama"})
    with pytest.raises(ValueError, match="model_type differs"):
        check_compatible([speed, other_type])
    other_vocab = Checkpoint("v", speed.state_dict, {**speed.config, "vocab_size": 999})
    with pytest.raises(ValueError, match="vocab_size differs"):
        check_compatible([speed, other_vocab])
    other_tokens = Checkpoint("t", speed.state_dict, speed.config, vocab_fingerprint="something-else")
    with pytest.raises(ValueError, match="different vocabularies"):
        check_compatible([speed, other_tokens])
    wider = ForgeForCausalLM(ForgeConfig.from_dict({**speed.config, "memory_size": 16}))
    from trainers.merging import checkpoint_from_model

    with pytest.raises(ValueError, match=r"tensor model\.layers\.\*\.memory\.conv_weight has shape"):
        check_compatible([speed, checkpoint_from_model(wider, "wider")])
    deeper = Checkpoint("deep", speed.state_dict, {**speed.config, "num_hidden_layers": 3})
    with pytest.raises(ValueError, match="num_hidden_layers differs"):
        check_compatible([speed, deeper])
    check_compatible([speed, deeper], same_depth=False)  # layer stacking may change the depth
    # a real transformers model of another type, loaded from its folder
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=speed.config["vocab_size"], hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4))  # fmt: skip
    llama.save_pretrained(tmp_path / "llama")
    recipe = MergeRecipe.from_dict({"merge_method": "linear", "models": ["speed", str(tmp_path / "llama")]})
    with pytest.raises(ValueError, match=r"model_type differs \('forge' vs 'llama'\)"):
        run_recipe(recipe, {"speed": speed})


def test_task_vectors_from_an_unrelated_base_are_refused(loaded, family, tmp_path, tiny_tokenizer):
    stranger = build_model(loaded["init"])
    torch.manual_seed(123)
    stranger = ForgeForCausalLM(stranger.config)  # another random init: not the children's ancestor
    save_phase_output(tmp_path / "stranger", model=stranger, tokenizer=tiny_tokenizer, phase=1,
                      phase_name="cognate-init", config={})  # fmt: skip
    refs = {name: str(path) for name, path in family.items()}
    by_path = {refs[name]: ck for name, ck in loaded.items()}
    recipe = {"merge_method": "ties", "base_model": str(tmp_path / "stranger"),
              "models": [refs["reasoning"], refs["speed"]], "parameters": {"density": 0.5}}  # fmt: skip
    with pytest.raises(ValueError, match="does not descend from base_model.*no common ancestor"):
        run_recipe(MergeRecipe.from_dict(recipe), by_path)
    merged = run_recipe(MergeRecipe.from_dict({**recipe, "allow_unrelated_base": True}), by_path)  # opted in: merges
    assert merged.config["num_hidden_layers"] == 2
    run_recipe(MergeRecipe.from_dict({**recipe, "base_model": refs["init"]}), by_path)  # the real ancestor: fine


# ---------------------------------------------------------------------------------------------------------------
# Hub folders.


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties", "franken", "dfs", "pipeline"])
def test_every_merge_writes_a_folder_that_loads_and_generates(method, family, loaded, tmp_path):
    refs = {name: str(path) for name, path in family.items()}
    parents = [refs["reasoning"], refs["memory"], refs["speed"]]
    layer = lambda model, i, scale=1.0: {"sources": [{"model": model, "layer_range": [i, i + 1]} |  # noqa: E731
                                                     ({"scale": scale} if scale != 1.0 else {})]}  # fmt: skip
    recipes = {
        "linear": {"merge_method": "linear", "models": parents},
        "slerp": {"merge_method": "slerp", "models": parents},
        "ties": {"merge_method": "ties", "base_model": refs["init"], "models": parents,
                 "parameters": {"density": 0.5}},
        "dare_ties": {"merge_method": "dare_ties", "base_model": refs["init"], "models": parents,
                      "parameters": {"density": 0.5, "seed": 3}},
        "franken": {"merge_method": "franken", "base_model": refs["speed"],
                    "slices": [layer(refs["memory"], 0), layer(refs["reasoning"], 1)]},
        "dfs": {"merge_method": "dfs", "base_model": refs["speed"],
                "slices": [layer(refs["speed"], 0), layer(refs["memory"], 1, 0.8), layer(refs["speed"], 1)]},
        "pipeline": {"stages": [
            {"name": "soup", "merge_method": "slerp", "models": parents},
            {"name": "tv", "merge_method": "dare_ties", "base_model": refs["init"], "models": ["soup", *parents]},
            {"merge_method": "dfs", "base_model": "tv", "slices": [layer("tv", 0), layer("soup", 1), layer("tv", 1)]},
        ]},
    }  # fmt: skip
    recipe = MergeRecipe.from_dict(recipes[method])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe.to_yaml())
    from recipes.merge import main, make_parser

    (config,) = make_parser().parse_args_and_config(["--recipe", str(recipe_file), "--out", str(tmp_path / "out")])
    folder = Path(main(config))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_path = {refs[name]: ck for name, ck in loaded.items()}
    input_ids = tokenizer("ROMEO. ", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, merged_model(recipe, by_path)(input_ids).logits, atol=1e-5)
        generated = model.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == input_ids.shape[1] + 5
    card = (folder / "README.md").read_text()
    assert recipe.to_yaml().strip() in card and "## Recipe" in card
    lineage = json.loads((folder / "forge_lineage.json").read_text())
    assert lineage["phase"] == 2 and lineage["card_template"] == "merge"
    assert {item["id"] for item in lineage["inputs"]} == set(recipe.sources())
    assert MergeRecipe.from_dict(lineage["config"]["recipe"]) == recipe


# ---------------------------------------------------------------------------------------------------------------
# Recipes.


VALID_RECIPES = [
    {"merge_method": "ties", "base_model": "init", "dtype": "float32",
     "models": [{"model": "a", "parameters": {"weight": [0.5, 1.0]}}, {"model": "b"}],
     "parameters": {"density": [{"filter": "self_attn", "value": 0.7}, {"value": 0.5}], "lambda": 1.2}},
    {"stages": [
        {"name": "soup", "merge_method": "slerp", "models": ["a", "b", "c"]},
        {"name": "tv", "merge_method": "dare_ties", "base_model": "init", "models": ["soup", "a"],
         "parameters": {"density": 0.4, "seed": 7, "majority_sign_method": "frequency"}},
        {"merge_method": "dfs", "base_model": "tv", "slices": [
            {"sources": [{"model": "tv", "layer_range": [0, 2]}]},
            {"sources": [{"model": "a", "layer_range": [1, 2], "scale": 0.75}]}]},
    ], "dtype": "bfloat16", "tokenizer_source": "a", "config_overrides": {"trm_max_steps": 2, "act_threshold": 0.3}},
]  # fmt: skip


@pytest.mark.parametrize("data", VALID_RECIPES, ids=["single", "stages"])
def test_valid_recipes_round_trip_through_yaml(data):
    recipe = MergeRecipe.from_dict(data)
    again = MergeRecipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.key() == recipe.key()
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()
    assert MergeRecipe.from_dict(yaml.safe_load(yaml.safe_dump(data))) == recipe


_TIES = {"merge_method": "ties", "base_model": "init", "models": ["a", "b"]}
_DFS = {"merge_method": "dfs", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}
INVALID_RECIPES = {
    "unknown field": (
        {**_TIES, "merge_metod": "x"},
        r"recipe merge_metod: is not a recipe field; did you mean 'merge_method'",
    ),
    "unknown method": (
        {**_TIES, "merge_method": "tie"},
        r"recipe merge_method: Unknown merge method 'tie'\. Did you mean 'ties'",
    ),
    "missing method": ({"models": ["a"]}, r"recipe merge_method: is missing"),
    "base required": ({"merge_method": "ties", "models": ["a"]}, r"recipe base_model: ties merges task vectors"),
    "base unused": (
        {"merge_method": "linear", "base_model": "a", "models": ["b"]},
        r"recipe base_model: linear does not use",
    ),
    "models missing": ({"merge_method": "linear"}, r"recipe models: linear needs a non-empty list"),
    "model entry key": (
        {**_TIES, "models": [{"model": "a", "weight": 1}]},
        r"recipe models\[0\]\.weight: is not a recipe field",
    ),
    "model name": ({**_TIES, "models": [{"model": 3}]}, r"recipe models\[0\]\.model: must name a model folder"),
    "unknown parameter": ({**_TIES, "parameters": {"t": 0.5}}, r"recipe parameters\.t: is not a parameter of ties"),
    "density range": (
        {**_TIES, "parameters": {"density": 1.5}},
        r"recipe parameters\.density: must lie in \(0\.0, 1\.0\], got 1\.5",
    ),
    "weight type": (
        {**_TIES, "models": [{"model": "a", "parameters": {"weight": "heavy"}}]},
        r"recipe models\[0\]\.parameters\.weight: must be a finite number",
    ),
    "filter entry": (
        {**_TIES, "parameters": {"density": [{"match": "mlp", "value": 0.5}]}},
        r"recipe parameters\.density\[0\]: filter entries are",
    ),
    "seed per tensor": (
        {**_TIES, "merge_method": "dare_ties", "parameters": {"seed": [1, 2]}},
        r"recipe parameters\.seed: takes one value for the whole merge",
    ),
    "slices on linear": (
        {"merge_method": "linear", "models": ["a"], "slices": []},
        r"recipe slices: linear merges tensor by tensor",
    ),
    "slices missing": ({"merge_method": "dfs"}, r"recipe slices: dfs needs slices"),
    "models on dfs": ({**_DFS, "models": ["a"]}, r"recipe models: dfs takes its layers from slices"),
    "layer range": (
        {**_DFS, "slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}]},
        r"recipe slices\[0\]\.sources\[0\]\.layer_range: must be \[start, end\]",
    ),
    "scale": (
        {**_DFS, "slices": [{"sources": [{"model": "a", "layer_range": [0, 1], "scale": -1}]}]},
        r"recipe slices\[0\]\.sources\[0\]\.scale: must be a positive number",
    ),
    "two sources": (
        {**_DFS, "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}] * 2}]},
        r"recipe slices\[0\]\.sources: must list exactly one source",
    ),
    "franken scale": (
        {"merge_method": "franken", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1], "scale": 0.5}]}]},
        r"recipe slices\[0\]\.sources\[0\]\.scale: franken does not scale",
    ),
    "slerp t": (
        {"merge_method": "slerp", "models": ["a", "b", "c"], "parameters": {"t": 0.3}},
        r"recipe parameters\.t: t interpolates exactly two models",
    ),
    "dtype": ({**_TIES, "dtype": "fp8"}, r"recipe dtype: 'fp8' is not one of float32, float16, bfloat16"),
    "allow flag": ({**_TIES, "allow_unrelated_base": "yes"}, r"recipe allow_unrelated_base: must be true or false"),
    "stage name": (
        {"stages": [{**_TIES, "name": "x"}, {**_TIES, "name": "x"}]},
        r"recipe stages\[1\]\.name: 'x' is used by an earlier stage",
    ),
    "self reference": (
        {"stages": [{**_TIES, "name": "x", "models": ["x"]}]},
        r"recipe stages\[0\]\.models\[0\]\.model: a stage cannot read its own output",
    ),
    "stage field": ({"stages": [{**_TIES, "dtype": "float32"}]}, r"recipe stages\[0\]\.dtype: is not a recipe field"),
    "config override field": (
        {**_TIES, "config_overrides": {"hidden_size": 32}},
        r"recipe config_overrides\.hidden_size: cannot be set by a merge",
    ),
    "config override value": (
        {**_TIES, "config_overrides": {"act_threshold": 1.5}},
        r"recipe config_overrides\.act_threshold: must be a number strictly between 0 and 1",
    ),
    "empty stages": ({"stages": []}, r"recipe stages: must be a non-empty list"),
}


@pytest.mark.parametrize("case", sorted(INVALID_RECIPES))
def test_each_invalid_field_gets_its_own_error(case):
    data, message = INVALID_RECIPES[case]
    with pytest.raises(RecipeError, match=message):
        MergeRecipe.from_dict(data)


def test_the_layer_input_scales_config_field_is_validated(tiny_config):
    assert tiny_config(layer_input_scales=[1.0, 0.5]).layer_input_scales == [1.0, 0.5]
    assert tiny_config().layer_input_scales is None  # default: no scaling
    for bad in ([1.0], [1.0, -0.5], [1.0, float("inf")]):
        with pytest.raises(ValueError, match=r"ForgeConfig\.layer_input_scales must hold one positive finite factor"):
            tiny_config(layer_input_scales=bad)
