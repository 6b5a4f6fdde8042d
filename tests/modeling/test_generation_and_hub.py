"""Generation with the cache, save/load round trips (installed package and `trust_remote_code`), pipelines."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_forge import ForgeConfig, ForgeForCausalLM


def _model(config, seed=0):
    torch.manual_seed(seed)
    return ForgeForCausalLM(config).eval()


def _memory(kind: str) -> dict:
    """Config overrides of a memory setting; "hybrid": the neural memory in the second layer only."""
    return {"memory_type": "neural", "memory_layers": [1]} if kind == "hybrid" else {"memory_type": kind}


@pytest.mark.parametrize("memory_type", ["neural", "ema", "none", "hybrid"])
def test_cached_generation_equals_uncached_with_left_padding(tiny_config, memory_type):
    """Greedy, 64 new tokens, window 8 (so the cache slides), two prompts of different lengths, left-padded."""
    # A wide init so an untrained model's greedy stream depends on its context (std 0.02 repeats one token).
    model = _model(tiny_config(**_memory(memory_type), pad_token_id=0, eos_token_id=None, initializer_range=0.3))
    gen = torch.Generator().manual_seed(7)
    short, long = torch.randint(1, 97, (5,), generator=gen), torch.randint(1, 97, (11,), generator=gen)
    input_ids = torch.zeros(2, 11, dtype=torch.long)
    attention_mask = torch.zeros(2, 11, dtype=torch.long)
    input_ids[0, 6:], attention_mask[0, 6:] = short, 1
    input_ids[1], attention_mask[1] = long, 1
    kwargs = {"max_new_tokens": 64, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        uncached = model.generate(input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        alone = model.generate(short[None], use_cache=True, **kwargs)
    assert cached.shape == (2, 11 + 64)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[0, 6:], alone[0])  # padding changes nothing for the short prompt
    assert len(set(cached[1, 11:].tolist())) > 5  # not a degenerate constant stream


def test_cache_holds_window_kv_and_memory_state(tiny_config):
    model = _model(tiny_config(sliding_window=8))
    with torch.no_grad():
        out = model(torch.randint(0, 97, (2, 20)), use_cache=True)
    cache = out.past_key_values
    assert cache.get_seq_length() == 20
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == 7  # window - 1 keys kept for the next token
    state = cache.get_recurrent_state(0)  # the neural memory: one (d, d) matrix per head, in fp32
    memory = model.model.layers[0].memory
    assert state is not None and state.shape == (2, memory.num_heads, memory.head_dim, memory.head_dim)
    assert state.dtype == torch.float32
    conv_tail = cache.get_conv_state(0)  # the last conv_size - 1 inputs of the q/k/v convolutions
    assert conv_tail.shape == (2, 3 * model.config.memory_size, model.config.memory_conv_size - 1)


def test_save_and_auto_load_give_identical_logits(tiny_config, tmp_path):
    model = _model(tiny_config())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "forge"
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("ForgeForCausalLM")
    assert (tmp_path / "modeling_forge.py").exists() and (tmp_path / "configuration_forge.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ForgeForCausalLM
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_trust_remote_code_loads_without_the_package(tiny_config, tmp_path):
    model = _model(tiny_config())
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    x = torch.randint(0, 97, (2, 30))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x).logits
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_forge"] = None  # this package is "not installed" here
        import torch
        from transformers import AutoModelForCausalLM
        try:
            import modeling_forge  # noqa
            raise SystemExit("modeling_forge should not be importable")
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "x.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env={**_base_env(), **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def _base_env():
    import os

    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",)}


def test_text_generation_pipeline_from_folder(tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer
    config = ForgeConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = _model(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=str(tmp_path), device="cpu")
    text = generator("To be, or not", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("To be").input_ids == tokenizer("To be").input_ids


def test_presets_and_parameter_budget():
    tiny = ForgeConfig.from_preset("tiny")
    assert (tiny.hidden_size, tiny.num_hidden_layers) == (64, 2)
    config = ForgeConfig.from_preset("cognate-25m")
    with torch.device("meta"):
        model = ForgeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert 24_000_000 <= n_params <= 26_000_000, n_params
    assert config.sliding_window == 1024 and config.memory_size == 160 and config.num_attention_heads == 5


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"sliding_window": 0}, "sliding_window"),
        ({"hidden_size": 64, "num_attention_heads": 5}, "hidden_size"),
        ({"memory_type": "lstm"}, "memory_type"),
        ({"memory_decay": 1.0}, "memory_decay"),
        ({"trm_step_weights": [1.0, 2.0]}, "trm_step_weights"),
        ({"act_threshold": 1.5}, "act_threshold"),
        ({"deep_supervision_fraction": 0.0}, "deep_supervision_fraction"),
        ({"deep_supervision": False, "trm_detach_between_steps": True}, "trm_detach_between_steps"),
    ],
)
def test_invalid_fields_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ForgeConfig\.{field}.*Fix:"):
        ForgeConfig.from_preset("tiny", **overrides)


def test_unknown_preset_and_wrong_model_type(tmp_path):
    with pytest.raises(ValueError, match="Unknown ForgeConfig preset 'huge'.*tiny"):
        ForgeConfig.from_preset("huge")
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="model_type 'llama'.*'forge'"):
        ForgeForCausalLM.from_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "llama"  # Auto classes still route it correctly


@pytest.mark.parametrize("memory_type", ["neural", "ema", "none", "hybrid"])
def test_multi_token_continuation_from_the_cache_equals_one_forward(tiny_config, memory_type):
    """Chunked prefill: feeding the sequence in pieces of 1-12 tokens through the cache (window 8, so the window
    slides inside and across pieces) gives the logits of one uncached forward, exactly in float64."""
    model = _model(tiny_config(**_memory(memory_type), initializer_range=0.3)).double()
    x = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :13], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for start, end in ((13, 20), (20, 21), (21, 33), (33, 40)):
            out = model(x[:, start:end], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)


def test_beam_search_reorders_the_memory_state_with_the_cache(tiny_config):
    model = _model(tiny_config(initializer_range=0.3, pad_token_id=0, eos_token_id=None)).double()
    x = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    kwargs = {"num_beams": 3, "max_new_tokens": 20, "do_sample": False}
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kwargs)
        uncached = model.generate(x, use_cache=False, **kwargs)
    assert cached.shape == (2, 30) and torch.equal(cached, uncached)
