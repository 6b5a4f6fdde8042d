"""`memory_layers`: the memory branch and MAG gate in chosen layers only (a hybrid stack), its validation, its
cache layout, save/load, and how layer-stacking merges carry it."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_forge import ForgeConfig, ForgeForCausalLM
from trainers.merging import Checkpoint, build_model
from trainers.merging.franken import stack_layers


def _model(config, seed=0):
    torch.manual_seed(seed)
    return ForgeForCausalLM(config).eval()


def test_memory_sits_only_in_the_listed_layers_and_does_work_there(tiny_config):
    model = _model(tiny_config(memory_layers=[1], initializer_range=0.3))
    assert model.model.layers[0].memory is None and model.model.layers[0].gate is None
    assert model.model.layers[1].memory is not None and model.model.layers[1].gate is not None
    assert model.config.layer_types == ["sliding_attention", "hybrid_sliding"]
    assert not any(name.startswith("model.layers.0.memory") for name in model.state_dict())
    full = _model(tiny_config(initializer_range=0.3))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x, use_cache=True)
        assert out.gate_means.shape == (2, 1)  # one gated layer
        assert out.past_key_values.get_recurrent_state(1) is not None
        model.model.layers[1].memory.o_proj.weight.zero_()  # silencing the one memory changes the output
        assert not torch.allclose(model(x).logits, out.logits, atol=1e-4)


def test_hybrid_model_round_trips_through_auto_class(tiny_config, tmp_path):
    model = _model(tiny_config(memory_layers=[1], initializer_range=0.3))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.memory_layers == [1]
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"memory_layers": [2]}, r"memory_layers must be distinct increasing layer indices in \[0, 2\)"),
        ({"memory_layers": [1, 1]}, "memory_layers must be distinct"),
        ({"memory_layers": [1, 0]}, "memory_layers must be distinct increasing"),
        ({"memory_layers": []}, "memory_layers must be distinct"),
        ({"memory_layers": [0], "memory_type": "none"}, "memory_layers is \\[0\\] but memory_type is 'none'"),
    ],
)
def test_bad_memory_layers_are_refused_naming_the_field(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_valid_memory_layers_are_accepted(tiny_config):
    every = tiny_config(memory_layers=[0, 1])
    assert every.layer_types == tiny_config().layer_types == ["hybrid_sliding", "hybrid_sliding"]
    assert tiny_config(memory_layers=[0]).layer_types == ["hybrid_sliding", "sliding_attention"]
    assert ForgeConfig.from_dict(tiny_config(memory_layers=[1]).to_dict()).memory_layers == [1]


def test_layer_stacking_carries_each_source_layers_memory(tiny_config):
    """A DFS path copies a layer with its memory or without: the new stack's `memory_layers` follow the path."""
    source = _model(tiny_config(memory_layers=[1], initializer_range=0.3))
    config = {k: v for k, v in source.config.to_dict().items() if k != "layer_types"}
    checkpoint = Checkpoint(name="hybrid", state_dict=source.state_dict(), config=config)
    stacked = stack_layers([(checkpoint, 1, 1.0), (checkpoint, 0, 1.0), (checkpoint, 1, 1.0)], checkpoint, "s", [])
    assert stacked.config["memory_layers"] == [0, 2] and stacked.config["num_hidden_layers"] == 3
    model = build_model(stacked)  # strict: every tensor fits the derived layout
    assert [layer.memory is not None for layer in model.model.layers] == [True, False, True]
    plain = stack_layers([(checkpoint, 0, 1.0), (checkpoint, 0, 1.0)], checkpoint, "p", [])
    assert plain.config["memory_type"] == "none" and plain.config["memory_layers"] is None
    assert all(layer.memory is None for layer in build_model(plain).model.layers)
    every = stack_layers([(checkpoint, 1, 1.0), (checkpoint, 1, 1.0)], checkpoint, "e", [])
    assert every.config["memory_layers"] is None  # every layer has memory: the default
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()
