"""The TRM x Titans-MAG language model as a transformers model.

Importing this package registers `ForgeConfig` with `AutoConfig` and the models with `AutoModel` /
`AutoModelForCausalLM`, and marks them for `save_pretrained` to copy their code and write `auto_map`, so a saved
folder also loads with `trust_remote_code=True` on machines without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .bitnet import BitLinear, BitNetLayout, QuantizedEmbedding, bitnet_to_shadow, convert_to_bitnet, pack_bitnet
from .configuration_forge import ForgeConfig, available_presets
from .modeling_forge import (
    ForgeCausalLMOutputWithPast,
    ForgeForCausalLM,
    ForgeModel,
    ForgeModelOutputWithPast,
    ForgePreTrainedModel,
    ema_scan,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
)

AutoConfig.register(ForgeConfig.model_type, ForgeConfig, exist_ok=True)
AutoModel.register(ForgeConfig, ForgeModel, exist_ok=True)
AutoModelForCausalLM.register(ForgeConfig, ForgeForCausalLM, exist_ok=True)
ForgeConfig.register_for_auto_class()
ForgeModel.register_for_auto_class("AutoModel")
ForgeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "BitLinear",
    "BitNetLayout",
    "ForgeCausalLMOutputWithPast",
    "ForgeConfig",
    "ForgeForCausalLM",
    "ForgeModel",
    "ForgeModelOutputWithPast",
    "ForgePreTrainedModel",
    "QuantizedEmbedding",
    "available_presets",
    "bitnet_to_shadow",
    "convert_to_bitnet",
    "ema_scan",
    "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent",
    "pack_bitnet",
]
