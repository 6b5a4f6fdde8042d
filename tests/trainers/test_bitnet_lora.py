"""PEFT LoRA on ternary BitLinear layers: the adapter trains through the quantizer, merges bit-exactly, and the merged
model packs into the 2-bit format; a bake on a ternary model works."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modeling_forge import ForgeForCausalLM
from modeling_forge.bitnet import BitLinear, BitNetLayout, bitnet_candidates, convert_to_bitnet, pack_bitnet
from trainers.baking_config import PromptBakingConfig
from trainers.baking_trainer import run_prompt_baking
from trainers.bitnet_lora import BitLinearLora, register_bitnet_lora


def _ternary_model(tiny_config, seed: int = 0, vocab_size: int = 97, **overrides) -> ForgeForCausalLM:
    torch.manual_seed(seed)
    model = ForgeForCausalLM(tiny_config(vocab_size=vocab_size, **overrides))
    layout = BitNetLayout(modules=bitnet_candidates(model, ["attention", "mlp"]), embedding_bits=32)
    convert_to_bitnet(model, layout)
    return model


def test_peft_alone_refuses_bitlinear_and_the_registered_config_wraps_it(tiny_config):
    model = _ternary_model(tiny_config)
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    model = _ternary_model(tiny_config)
    peft_model = get_peft_model(model, register_bitnet_lora(LoraConfig(r=4, target_modules=["q_proj", "up_proj"])))
    wrapped = [m for m in peft_model.modules() if isinstance(m, BitLinearLora)]
    assert len(wrapped) == 2 * model.config.num_hidden_layers


def test_lora_on_bitlinear_trains_through_the_quantizer_and_merges_bit_exactly(tiny_config):
    model = _ternary_model(tiny_config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = r".*\.(self_attn\.(q|v)_proj|mlp\.down_proj)$"  # BitLinear layers only (memory/TRM stay nn.Linear)
    config = register_bitnet_lora(LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    peft_model = get_peft_model(model, config)
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(30):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.2, losses  # the adapters learn although the layer output is ternary
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 3 * model.config.num_hidden_layers and all(p.abs().sum() > 0 for p in lora_b)

    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():  # the teacher of a bake: the base model, adapters off
            base_logits = peft_model(input_ids=ids).logits
    assert not torch.allclose(adapted, base_logits)
    merged = peft_model.merge_and_unload()
    assert all(isinstance(merged.base_model.get_submodule(n), BitLinear) for n in model.config.bitnet["modules"])
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert torch.equal(merged_logits, adapted)  # merging into the shadow weight changes nothing
    changed = [n for n, p in merged.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed) and not any("gate_proj" in n for n in changed)
    pack_bitnet(merged)
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, adapted)  # and packing keeps it


def test_lora_on_a_packed_bitlinear_names_the_fix(tiny_config):
    model = pack_bitnet(_ternary_model(tiny_config))
    with pytest.raises(ValueError, match="bitnet_to_shadow"):
        get_peft_model(model, register_bitnet_lora(LoraConfig(r=4, target_modules=["q_proj"])))


def test_prompt_bake_on_a_ternary_model_lowers_the_kl_and_stays_ternary(tiny_config, tiny_tokenizer):
    # initializer_range 0.1: at the preset's 0.02 a random model barely reads its prompt (KL prompted vs not ~5e-4,
    # noise that a bake cannot lower), so the test would assert nothing; at 0.1 the prompt moves the KL to ~0.2.
    # lr 1e-3: the delta is ternarized with the weight, and 1e-2 or more overshoots the thresholds (KL rises).
    model = _ternary_model(tiny_config, vocab_size=len(tiny_tokenizer), initializer_range=0.1)
    config = PromptBakingConfig(lora_r=8, lora_alpha=16, steps=60, num_samples=32, eval_samples=16,
                                max_new_tokens=8, batch_size=16, learning_rate=1e-3, top_k_logits=0)  # fmt: skip
    result = run_prompt_baking(model, tiny_tokenizer, "Be brief and kind.", config, inputs=["Hello"])
    assert result.kl_initial > 0.05, result.kl_initial  # the prompt matters to this model
    assert result.kl_final < 0.9 * result.kl_initial, (result.kl_initial, result.kl_final)
    # the ternary layers (not every "q_proj": the neural memory's and the refiner's stay nn.Linear by the layout)
    ternary = [result.model.model.get_submodule(n) for n in result.model.config.bitnet["modules"]]
    assert any(n.endswith("self_attn.q_proj") for n in result.model.config.bitnet["modules"])
    assert ternary and all(isinstance(m, BitLinear) and not m.packed for m in ternary)
