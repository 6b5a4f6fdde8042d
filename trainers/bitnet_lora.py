"""PEFT LoRA on ternary `BitLinear` layers, via peft's custom-module dispatch (`LoraConfig._register_custom_module`).

    config = register_bitnet_lora(LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    peft_model = get_peft_model(bitnet_model, config)   # BitLinear targets get `BitLinearLora` adapters
    merged = peft_model.merge_and_unload()              # still BitLinear: shadow weight W + B A * scale

peft refuses `BitLinear` by itself (it is not an `nn.Linear`). `BitLinearLora` is peft's own `lora.Linear` (adapter
bookkeeping, `merge`/`unmerge`, `get_delta_weight`, disabled-adapter teacher) with one change, hand-written here
because no library has it: the adapter acts *inside* the quantizer. The forward is the BitNet product of the
ternarized effective weight `W + sum_a scale_a * B_a A_a` (straight-through gradients to A and B, as for the shadow
weight in STE training), so the model stays ternary while it trains, and merging the adapter into the shadow weight
gives bit-identical outputs: the merged model packs into the same 2-bit checkpoint format. (A full-precision LoRA
branch beside the ternary layer would change the outputs when merged and could not be packed.)

The base layer must be in shadow form (`modeling_forge.bitnet.bitnet_to_shadow`): a packed layer has no
full-precision weight to merge into. Lives in `trainers/` because `modeling_forge` must not import peft.
"""

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from modeling_forge.bitnet import BitLinear, BitLinearSTE


class BitLinearLora(LoraLinear):
    """peft's LoRA `Linear` around a shadow-form `BitLinear`; the adapter's delta is ternarized with the weight."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        layer = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(layer, BitLinear):
            raise TypeError(f"BitLinearLora wraps a BitLinear, got {type(layer).__name__}.")
        if layer.packed:
            raise ValueError(
                "LoRA on a packed BitLinear: it has no full-precision weight to train through or merge into. Fix: "
                "call modeling_forge.bitnet.bitnet_to_shadow(model) before get_peft_model (pack_bitnet after merging)."
            )
        if config.use_dora or config.lora_bias or config.lora_dropout:
            raise ValueError(
                "LoRA on BitLinear supports plain LoRA only (the delta is ternarized with the weight, so there is no "
                "separate branch to drop out). Fix: set use_dora=False, lora_bias=False and lora_dropout=0."
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features  # peft's generic lookup warns on layer types it does not know

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if self.merged or not active:
            return base(x)
        weight = base.weight
        for adapter in active:  # the effective shadow weight; ternarized (STE) in the BitNet product below
            weight = weight + self.get_delta_weight(adapter).to(weight.dtype)
        return BitLinearSTE.apply(x, weight, base.bias, base.activation_bits)


def register_bitnet_lora(config: LoraConfig) -> LoraConfig:
    """Let `config` put adapters on `BitLinear` targets (returns the same config, registered)."""
    config._register_custom_module({BitLinear: BitLinearLora})
    return config


__all__ = ["BitLinearLora", "register_bitnet_lora"]
