"""BitNet b1.58: ternary quantizers, the STE, 2-bit packing, packed checkpoints through both loading routes."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from modeling_forge import ForgeConfig, ForgeForCausalLM, bitnet
from modeling_forge.bitnet import (
    BitLinear,
    BitNetLayout,
    QuantizedEmbedding,
    TiedLMHead,
    bitlinear_product,
    bitnet_candidates,
    bitnet_to_shadow,
    convert_to_bitnet,
    dequantize_embedding,
    lane_pack,
    load_packed_kernel,
    pack_bitnet,
    pack_ternary,
    quantize_embedding,
    set_bitnet_kernel,
    ternarize,
    unpack_ternary,
)


def _tiny(tiny_config, seed=0, **overrides) -> ForgeForCausalLM:
    torch.manual_seed(seed)
    return ForgeForCausalLM(tiny_config(**overrides)).eval()


def _reference_ste(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The textbook BitNet STE (quantize-dequantize in floating point, `w + (q(w) - w).detach()`)."""
    scale = weight.abs().mean().clamp(min=1e-5)
    w_q = weight + ((weight / scale).round().clamp(-1, 1) * scale - weight).detach()
    x_scale = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    x_q = x + ((x * x_scale).round().clamp(-128, 127) / x_scale - x).detach()
    return F.linear(x_q, w_q)


# ----------------------------------------------------------------------------------------------------------------
# Quantizers and the straight-through estimator
# ----------------------------------------------------------------------------------------------------------------


def test_bitlinear_uses_only_ternary_weights_times_one_absmean_scale():
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    layer = BitLinear.from_linear(linear)
    w_int, scale = layer.quantized()
    assert set(w_int.unique().tolist()) == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(scale, linear.weight.detach().abs().mean().reshape(1))
    effective = layer.dequantized_weight()
    assert torch.allclose(effective.abs().unique(), torch.cat([torch.zeros(1), scale]))
    # The forward is the per-token 8-bit activations times that ternary weight (plus the fp bias).
    x = torch.randn(3, 5, 48) * torch.linspace(0.1, 10, 5)[None, :, None]  # tokens with very different ranges
    x_scale = 127 / x.abs().amax(-1, keepdim=True)
    x_q = (x * x_scale).round() / x_scale
    assert (x * x_scale).round().abs().max() <= 127
    torch.testing.assert_close(layer(x), F.linear(x_q, effective, linear.bias), rtol=1e-5, atol=1e-5)
    # A weight far from its grid is not what the layer computes with.
    assert (layer(x) - linear(x)).abs().max() > 1e-2


def test_ste_passes_gradients_to_the_shadow_weight_and_the_input():
    torch.manual_seed(0)
    layer = BitLinear.from_linear(nn.Linear(32, 24, bias=False))
    x = torch.randn(4, 7, 32, requires_grad=True)
    target = torch.randn(4, 7, 24)
    F.mse_loss(layer(x), target).backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    # The same gradients as the textbook STE formulation, whose forward rounds in floating point.
    weight = layer.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    F.mse_loss(_reference_ste(x_ref, weight), target).backward()
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("out_features", [1, 2, 3, 4, 5, 7, 9, 13, 66, 127])
@pytest.mark.parametrize("in_features", [1, 3, 17])
def test_pack_unpack_is_exact_for_awkward_shapes(out_features, in_features):
    torch.manual_seed(out_features * 31 + in_features)
    w_int = torch.randint(-1, 2, (out_features, in_features)).float()
    packed = pack_ternary(w_int)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-out_features // 4), in_features)
    assert torch.equal(unpack_ternary(packed, out_features, torch.float32), w_int)
    assert torch.equal(unpack_ternary(packed, out_features), w_int.to(torch.int8))


def test_packing_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match=r"outside \{-1, 0, 1\}"):
        pack_ternary(torch.tensor([[2.0, 0.0]]))
    with pytest.raises(ValueError, match="not 9"):  # 2 packed rows hold 5..8 output rows
        unpack_ternary(pack_ternary(torch.zeros(6, 3)), out_features=9)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_embedding_codecs_round_trip_within_half_a_step_and_are_idempotent(bits):
    torch.manual_seed(0)
    weight = torch.randn(50, 64) * torch.rand(50, 1)
    codes, scales = quantize_embedding(weight, bits, group_size=16)
    restored = dequantize_embedding(codes, scales, bits, group_size=16)
    if bits == 16:
        torch.testing.assert_close(restored, weight, rtol=1e-3, atol=1e-4)
    else:
        step = scales.float().repeat_interleave(16, dim=1)
        assert ((restored - weight).abs() <= step / 2 + 1e-6).all()
        assert codes.element_size() * codes.numel() == weight.numel() * bits // 8
    again = dequantize_embedding(*quantize_embedding(restored, bits, 16), bits, 16)
    assert torch.equal(again, restored)  # snapped values are on the grid: packing them changes nothing


# ----------------------------------------------------------------------------------------------------------------
# Converting, packing, saving and loading whole models
# ----------------------------------------------------------------------------------------------------------------


def test_convert_swaps_the_chosen_linears_and_keeps_the_rest(tiny_config):
    model = _tiny(tiny_config)
    names = convert_to_bitnet(model, BitNetLayout(exclude=["layers.1.gate.fc2"]))
    backbone = model.model
    # per layer: attention q/k/v/o, neural memory q/k/v/g/o, gate fc1/fc2, MLP gate/up/down;
    # then the TRM's 8 (z_init, 4 attention, 3 SwiGLU)
    assert len(names) == 2 * 14 + 8 - 1
    assert type(backbone.layers[0].memory.b_proj) is nn.Linear  # the memory's rate projections stay full precision
    assert all(isinstance(backbone.get_submodule(n), BitLinear) for n in names)
    assert isinstance(backbone.layers[1].gate.fc2, nn.Linear) and not isinstance(
        backbone.layers[1].gate.fc2, BitLinear
    )
    assert type(model.lm_head) is nn.Linear and type(backbone.embed_tokens) is nn.Embedding
    assert isinstance(backbone.recursion.act_head, nn.Linear)
    assert model.config.bitnet["format"] == "shadow" and model.config.bitnet["modules"] == names
    assert bitnet_candidates(model, ["trm"]) == [n for n in names if n.startswith("recursion.")]
    with pytest.raises(ValueError, match="Unknown BitNet groups"):
        bitnet_candidates(model, ["everything"])


def _packed_model(tiny_config, embedding_bits=8):
    model = _tiny(tiny_config)
    convert_to_bitnet(model, BitNetLayout(embedding_bits=embedding_bits, embedding_group_size=32))
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        shadow_logits = model(x).logits
    pack_bitnet(model)
    return model, x, shadow_logits


@pytest.mark.parametrize("embedding_bits", [32, 8, 4])
def test_packed_model_saves_small_and_loads_bit_identical(tiny_config, tmp_path, embedding_bits, caplog):
    model, x, shadow_logits = _packed_model(tiny_config, embedding_bits)
    with torch.no_grad():
        packed_logits = model(x).logits
    assert torch.equal(packed_logits, shadow_logits)  # the integer-exact forward: packing changes no bit
    assert all(p.weight is None for p in model.modules() if isinstance(p, BitLinear))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["bitnet"]["format"] == "packed" and len(config["bitnet"]["modules"]) == 2 * 14 + 8
    with caplog.at_level(logging.WARNING):
        loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert "corrupted" not in caplog.text and "newly initialized" not in caplog.text
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, BitLinear) and loaded.model.layers[0].mlp.up_proj.packed
    if embedding_bits != 32:
        assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding) and isinstance(loaded.lm_head, TiedLMHead)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, packed_logits)
    # Generation works from the packed folder.
    out = loaded.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_shadow_checkpoint_reloads_for_training(tiny_config, tmp_path):
    model = _tiny(tiny_config)
    convert_to_bitnet(model, BitNetLayout(embedding_bits=8, embedding_group_size=32))
    model.save_pretrained(tmp_path)  # what Trainer checkpoints during STE fine-tuning look like
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    layer = loaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, BitLinear) and not layer.packed and layer.weight.requires_grad
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_remote_code_route_loads_the_packed_checkpoint_without_the_package(tiny_config, tmp_path):
    model, x, _ = _packed_model(tiny_config, embedding_bits=4)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    assert (folder / "bitnet.py").exists()  # copied with the model code (a relative import of modeling_forge.py)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x).logits
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_forge"] = None  # this package is "not installed" here
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        layer = model.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == "BitLinear" and layer.weight is None, layer
        assert layer.kernel == "float", layer.kernel  # the folder has no C++ kernel source: the fp32 fallback
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "x.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        banned = sorted(m for m in ("trainers", "datasets", "peft", "trl") if m in sys.modules)
        assert not banned, f"the model code imported {{banned}}"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_checkpoint_linear_bytes_are_at_most_a_fifteenth_of_fp32(tiny_config, tmp_path):
    model, _, _ = _packed_model(tiny_config, embedding_bits=8)
    fp32 = _tiny(tiny_config)
    fp32.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / "packed")
    with safe_open(tmp_path / "packed" / "model.safetensors", "pt") as handle:
        sizes = {key: handle.get_tensor(key).numel() * handle.get_tensor(key).element_size() for key in handle.keys()}
    for name in model.config.bitnet["modules"]:
        layer = model.model.get_submodule(name)
        stored = sizes[f"model.{name}.weight_packed"] + sizes[f"model.{name}.weight_scale"]
        assert f"model.{name}.weight" not in sizes
        assert stored * 15 <= layer.in_features * layer.out_features * 4, name
    ratio = (tmp_path / "fp32" / "model.safetensors").stat().st_size / (
        tmp_path / "packed" / "model.safetensors"
    ).stat().st_size
    assert ratio > 6, ratio


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512", reason="bitsandbytes' CPU int8 GEMM needs AVX-512"
)
def test_int8_kernel_gives_the_same_bits_as_the_float_kernel(tiny_config):
    pytest.importorskip("bitsandbytes")
    model, x, _ = _packed_model(tiny_config)
    with torch.no_grad():
        expected = model(x).logits
        set_bitnet_kernel(model, "int8")
        assert model.model.layers[0].mlp.up_proj.weight_ternary.dtype == torch.int8
        assert torch.equal(model(x).logits, expected)


def test_packed_model_returns_to_shadow_form_for_further_training(tiny_config):
    model, x, _ = _packed_model(tiny_config)
    with torch.no_grad():
        packed_logits = model(x).logits
    ternary = {n: model.model.get_submodule(n).quantized()[0].clone() for n in model.config.bitnet["modules"]}
    bitnet_to_shadow(model)
    assert model.config.bitnet["format"] == "shadow" and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    for name, values in ternary.items():
        layer = model.model.get_submodule(name)
        assert not layer.packed and torch.equal(ternarize(layer.weight)[0], values), name
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, packed_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"format": "int8"}, "format"),
        ({"packing": "other-layout"}, "packing"),
        ({"embedding_bits": 3}, "embedding_bits"),
        ({"embedding_group_size": 7}, "embedding_group_size"),
        ({"activation_bits": 16}, "activation_bits"),
    ],
)
def test_invalid_bitnet_config_names_the_key(change, key):
    spec = {"format": "packed", "packing": "transformers-bitnet-2bit", "modules": [], "activation_bits": 8,
            "embedding_bits": 8, "embedding_group_size": 32}  # fmt: skip
    ForgeConfig.from_preset("tiny", bitnet=spec)  # valid
    with pytest.raises(ValueError, match=rf"bitnet\[{key!r}\]"):
        ForgeConfig.from_preset("tiny", bitnet={**spec, **change})
    with pytest.raises(ValueError, match="unknown keys"):
        ForgeConfig.from_preset("tiny", bitnet={**spec, "extra": 1})


# ----------------------------------------------------------------------------------------------------------------
# The "packed" CPU kernel (C++, built once per machine and cached by torch.utils.cpp_extension)
# ----------------------------------------------------------------------------------------------------------------

needs_packed_kernel = pytest.mark.skipif(load_packed_kernel() is None, reason="the packed kernel did not build here")


def test_lane_layout_holds_each_code_where_the_kernel_reads_it():
    torch.manual_seed(0)
    w_int = torch.randint(-1, 2, (19, 10))
    lanes = lane_pack(pack_ternary(w_int.float()), 19)
    assert lanes.shape == (2, 3 * 16) and lanes.dtype == torch.uint8  # rows to 32, columns to 12: 2 bits each
    # Row 16 t + 4 L + b // 4, column 4 j + b % 4 lives in bits 2L of byte 16 j + b of tile t; padding is code 1.
    codes = (lanes.view(2, 3, 1, 16) >> torch.tensor([0, 2, 4, 6]).view(1, 1, 4, 1)) & 3  # (t, j, L, b)
    decoded = codes.view(2, 3, 4, 4, 4).permute(0, 2, 3, 1, 4).reshape(32, 12).to(torch.int64) - 1
    assert torch.equal(decoded[:19, :10], w_int)
    assert (decoded[19:] == 0).all() and (decoded[:, 10:] == 0).all()


@needs_packed_kernel
@pytest.mark.parametrize("activation_bits", [8, 4])
@pytest.mark.parametrize("out_features", [1, 6, 66, 127, 200])
@pytest.mark.parametrize("in_features", [1, 17, 65, 160])
def test_packed_kernel_gives_the_reference_bits_on_awkward_shapes(out_features, in_features, activation_bits):
    torch.manual_seed(out_features * 7 + in_features)
    w_int = torch.randint(-1, 2, (out_features, in_features)).float()
    lanes = lane_pack(pack_ternary(w_int), out_features)
    scale = torch.rand(1) + 0.05
    bias = torch.randn(out_features) if out_features % 2 == 0 else None
    for batch in (1, 3, 9, 14):  # 9, 14 tokens: full tiles of 6 and remainders
        x = torch.randn(batch, in_features) * torch.logspace(-3, 2, batch)[:, None]
        x[batch // 2] = 0.0  # an all-zero token: the absmax clamp
        expected = bitlinear_product(x, w_int, scale, bias, activation_bits)[0]
        qmax = 2 ** (activation_bits - 1) - 1
        for isa in (0, 1, 2):  # scalar, AVX2, AVX-512 VNNI (capped at what this CPU has)
            out = torch.ops.forge_bitnet.bitlinear(x, lanes, scale, bias, out_features, qmax, 1e-5, isa)
            assert torch.equal(out, expected), (batch, isa, (out - expected).abs().max())


@needs_packed_kernel
def test_packed_kernel_splits_rows_across_threads_with_the_same_bits():
    torch.manual_seed(0)
    w_int = torch.randint(-1, 2, (1090, 320)).float()  # 69 row tiles: several tasks per thread
    lanes, scale, bias = lane_pack(pack_ternary(w_int), 1090), torch.tensor([0.02]), torch.randn(1090)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for batch in (1, 7, 40):
            x = torch.randn(batch, 320)
            out = torch.ops.forge_bitnet.bitlinear(x, lanes, scale, bias, 1090, 127, 1e-5)
            assert torch.equal(out, bitlinear_product(x, w_int, scale, bias, 8)[0]), batch
    finally:
        torch.set_num_threads(threads)


@needs_packed_kernel
def test_packed_kernel_model_matches_the_other_kernels_bit_for_bit(tiny_config, tmp_path, caplog):
    model, x, shadow_logits = _packed_model(tiny_config, embedding_bits=4)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.kernel == "packed" and layer.weight_ternary is None  # pack_bitnet's default ("auto")
    assert layer.weight_lanes.dtype == torch.uint8  # 2 bits per weight (64 x 192: no padding), no dense cache
    assert layer.weight_lanes.numel() * 4 == layer.out_features * layer.in_features
    with torch.no_grad():
        logits = {"packed": model(x).logits}
        tokens = {"packed": model.generate(x[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)}
        kernels = ["float"] + (["int8"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
        for kernel in kernels:
            assert set_bitnet_kernel(model, kernel) == kernel
            logits[kernel] = model(x).logits
            tokens[kernel] = model.generate(x[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(logits["packed"], shadow_logits)
    for kernel in kernels:
        assert torch.equal(logits[kernel], logits["packed"]) and torch.equal(tokens[kernel], tokens["packed"])
    # Under autograd (the C++ op has no backward) the layer records the reference product's graph, as "float" does.
    h = torch.randn(2, 3, layer.in_features, requires_grad=True)
    reference = layer(h)
    set_bitnet_kernel(model, "packed")
    out = layer(h)
    assert out.requires_grad and out.grad_fn is not None and torch.equal(out, reference)
    # from_pretrained picks the packed kernel by default and says so in the log.
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="modeling_forge.bitnet"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert "kernel 'packed'" in caplog.text
    assert loaded.model.layers[1].mlp.down_proj.kernel == "packed"
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits["packed"])


@needs_packed_kernel
@pytest.mark.parametrize("embedding_bits", [8, 4])
def test_lm_head_reads_the_embedding_codes_when_decoding(tiny_config, embedding_bits):
    if torch.ops.forge_bitnet.isa() != "avx512-vnni":
        pytest.skip("the LM head kernel needs AVX-512")
    model, _, _ = _packed_model(tiny_config, embedding_bits)
    head, embedding = model.lm_head, model.model.embed_tokens
    h = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        assert head._reads_codes(h) and not head._reads_codes(torch.randn(1, 17, model.config.hidden_size))
        fast = head(h)
        single = torch.cat([head(h[:, i : i + 1]) for i in range(5)], dim=1)
        head.read_codes = False
        assert not head._reads_codes(h)
        reference = head(h)
    assert torch.equal(reference, F.linear(h, embedding.weight))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)  # the same products, another fp32 sum order
    assert not torch.equal(fast, reference)  # so the codes path really ran
    assert torch.equal(single, fast)  # a fixed order: a position's logits do not depend on the batch


def test_models_load_and_fall_back_when_the_packed_kernel_cannot_build(tiny_config, tmp_path, monkeypatch, caplog):
    model, x, _ = _packed_model(tiny_config)
    set_bitnet_kernel(model, "float")
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(bitnet, "_packed_kernel_state", {})  # forget the built kernel; no compiler on PATH
    monkeypatch.setattr(bitnet.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert "no C++ compiler" in caplog.text and "Using kernel 'float'" in caplog.text
    assert loaded.model.layers[0].self_attn.q_proj.kernel == "float"
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    with pytest.raises(ValueError, match="kernel='packed' is unavailable here: no C\\+\\+ compiler"):
        set_bitnet_kernel(loaded, "packed")
    with pytest.raises(ValueError, match="unknown"):
        set_bitnet_kernel(loaded, "lut")


def test_a_killed_builds_lock_file_is_cleared_and_a_clean_folder_is_left_alone(tmp_path, caplog):
    """torch's build `lock` file outlives a killed build and would make every later load wait forever."""
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "lock").touch()
    with caplog.at_level(logging.WARNING), bitnet._build_lock(stale):
        assert not (stale / "lock").exists()
    assert "stale build lock" in caplog.text
    caplog.clear()
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "forge_bitnet_packed_x.so").touch()
    with caplog.at_level(logging.WARNING), bitnet._build_lock(clean):
        pass
    assert "stale build lock" not in caplog.text and (clean / "forge_bitnet_packed_x.so").exists()
