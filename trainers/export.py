"""Phase 7 hand-off: copy the final model into a self-contained folder that loads and generates on CPU without this
package, and measure what the packed ternary form buys (size and decoding speed against dense fp32).

    from trainers.export import ExportConfig, export_model
    summary = export_model(ExportConfig(model="outputs/tiny/phase6", output_dir="outputs/tiny/export"))

The folder holds `config.json` (with `auto_map`), the weights, the model code (`modeling_forge.py`,
`configuration_forge.py`, `bitnet.py`), the tokenizer, `generation_config.json`, `forge_lineage.json`,
`export_report.json` and a card with the size/latency table. Before the folder is renamed into place, a child Python
started without `site` (so neither this package nor its editable install is importable) loads it with
`trust_remote_code=True` and generates greedily; the export fails unless that child's tokens equal the ones this
process generates with the package.

Table rows: the model as exported and its counterpart: for a packed BitNet model, a dense fp32 copy with the same
(dequantized) weights and no activation quantization; for a full-precision model, its post-training ternary packing
(size and speed only: that packed copy is not exported and its quality is not measured here).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

import modeling_forge  # noqa: F401  (registers the Forge model with the Auto classes)

from .phase_output import save_phase_output

logger = logging.get_logger(__name__)

REPORT_FILE = "export_report.json"

# Run by the child interpreter (`python -S`): no site-packages processing, so no .pth and no editable finder; the
# plain site-packages folder is appended by hand so transformers and torch import, but this package cannot.
CHILD_SCRIPT = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
hidden = {name: importlib.util.find_spec(name) is None for name in ("modeling_forge", "trainers", "evaluation")}
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2], trust_remote_code=True)
ids = tokenizer(sys.argv[3], return_tensors="pt")
out = model.generate(**ids, max_new_tokens=int(sys.argv[4]), do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"hidden": hidden, "module": type(model).__module__, "tokens": out[0].tolist(),
                  "text": tokenizer.decode(out[0], skip_special_tokens=True)}))
"""


@dataclass
class ExportConfig:
    """Settings of `recipes/export.py`."""

    model: str = field(default="outputs/tiny/phase6", metadata={"help": "The final phase's folder to export."})
    output_dir: str = field(default="outputs/tiny/export", metadata={"help": "The self-contained folder to write."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing export folder."})
    prompt: str = field(default="def add(a, b):\n", metadata={"help": "Prompt of the load-and-generate check."})
    check_tokens: int = field(default=16, metadata={"help": "Greedy tokens the check generates."})
    speed_tokens: int = field(default=32, metadata={"help": "New tokens per decoding-speed measurement."})
    speed_repeats: int = field(default=3, metadata={"help": "Alternating measurements per row (median kept)."})
    verify: bool = field(default=True, metadata={"help": "Run the package-free load-and-generate check."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the export folder to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo of --push_to_hub."})

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ValueError(f"ExportConfig.model {self.model!r} is not a folder. Fix: pass a phase output folder.")
        for name in ("check_tokens", "speed_tokens", "speed_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExportConfig.{name} must be >= 1. Fix: use a positive integer.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("ExportConfig.push_to_hub needs hub_model_id. Fix: pass --hub_model_id user/forge-final.")


def check_without_package(folder: str | Path, prompt: str, new_tokens: int, timeout: float = 600.0) -> dict:
    """Load `folder` and generate in a child interpreter that cannot import this package; returns its report."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    with tempfile.TemporaryDirectory() as scratch:
        env["HF_MODULES_CACHE"] = str(Path(scratch) / "modules")  # remote code copied here, not a shared cache
        result = subprocess.run(
            [sys.executable, "-S", "-c", CHILD_SCRIPT, sysconfig.get_paths()["purelib"], str(Path(folder).resolve()),
             prompt, str(new_tokens)],
            cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"The exported folder {folder} failed to load or generate without the agent-forge "
                           f"package:\n{result.stderr[-3000:]}")  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if not all(report["hidden"].values()):
        raise RuntimeError(f"The package-free check could still import {report['hidden']}; it proves nothing.")
    return report


@torch.no_grad()
def dense_fp32_copy(model) -> nn.Module:
    """A dense fp32 copy of a packed BitNet model: every BitLinear becomes an `nn.Linear` with its dequantized
    ternary weight (w * scale), the embedding its dequantized values; activations are no longer quantized."""
    from modeling_forge.bitnet import BitLinear, bitnet_to_shadow, ternarize

    dense = bitnet_to_shadow(copy.deepcopy(model))
    for name, module in list(dense.named_modules()):
        if isinstance(module, BitLinear):
            w_int, scale = ternarize(module.weight)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.copy_(w_int.float() * scale)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    dense.config.bitnet = None
    return dense.eval()


def packed_ternary_copy(model) -> nn.Module:
    """A post-training ternary, 2-bit packed copy of a full-precision Forge model (every candidate layer)."""
    from modeling_forge.bitnet import BitNetLayout, bitnet_candidates, convert_to_bitnet, pack_bitnet

    packed = copy.deepcopy(model)
    convert_to_bitnet(packed, BitNetLayout(modules=bitnet_candidates(packed), embedding_bits=32))
    return pack_bitnet(packed).eval()


def size_and_speed(models: dict[str, nn.Module], tokenizer, config: ExportConfig) -> dict[str, dict]:
    """Checkpoint bytes and median greedy decoding tokens/s (batch 1, CPU, measured in alternation) per model."""
    from .bitnet_trainer import compare_decode_speed, measure_checkpoint

    prompt = tokenizer(config.prompt, return_tensors="pt")["input_ids"]
    speed = compare_decode_speed(models, prompt, config.speed_tokens, tokenizer.pad_token_id, config.speed_repeats)
    rows = {}
    for name, model in models.items():
        storage = measure_checkpoint(model)
        rows[name] = {"checkpoint_bytes": storage["file_bytes"], "tokens_per_s": speed[name],
                      "parameters": model.num_parameters()}  # fmt: skip
    return rows


def export_model(config: ExportConfig) -> dict:
    """Write the self-contained hand-off folder (checked without the package) and return its report."""
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    bitnet = bool(getattr(model.config, "bitnet", None)) and model.config.bitnet.get("format") == "packed"
    if bitnet:
        models = {"packed ternary (exported)": model, "dense fp32 (same weights)": dense_fp32_copy(model)}
    else:
        models = {"fp32 (exported)": model, "packed ternary (post-training, not exported)": packed_ternary_copy(model)}
    rows = size_and_speed(models, tokenizer, config)
    names = list(rows)
    fp32_name = next(n for n in names if "fp32" in n)
    packed_name = next(n for n in names if "packed" in n)
    report = {
        "source": config.model, "exported_form": "packed ternary" if bitnet else "fp32", "rows": rows,
        "size_ratio_fp32_over_packed": rows[fp32_name]["checkpoint_bytes"] / rows[packed_name]["checkpoint_bytes"],
        "speed_ratio_packed_over_fp32": rows[packed_name]["tokens_per_s"] / rows[fp32_name]["tokens_per_s"],
        "speed": {"batch_size": 1, "new_tokens": config.speed_tokens, "threads": torch.get_num_threads(),
                  "repeats": config.speed_repeats, "device": "cpu",
                  "kernel": next((m.kernel for m in models[packed_name].modules() if hasattr(m, "weight_packed")),
                                 None)},
        "check": None,
    }  # fmt: skip
    # The child has no C++ kernels: its ternary layers give the same bits as the packed kernel's, but a tied LM head
    # that reads 4/8-bit codes (bitnet.TiedLMHead) sums in another fp32 order, so compare with the head it computes.
    head = getattr(model, "lm_head", None)
    reads_codes = bool(getattr(head, "read_codes", False))
    if reads_codes:
        head.read_codes = False
    with torch.no_grad():
        ids = tokenizer(config.prompt, return_tensors="pt")
        expected = model.generate(**ids, max_new_tokens=config.check_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0].tolist()  # fmt: skip
    if reads_codes:
        head.read_codes = True

    def write_extras(folder: Path) -> None:
        if config.verify:
            child = check_without_package(folder, config.prompt, config.check_tokens)
            if child["tokens"] != expected:
                raise RuntimeError(f"Without the package the export generated {child['tokens']}, with it {expected}.")
            report["check"] = {"package_hidden": child["hidden"], "model_class_module": child["module"],
                               "prompt": config.prompt, "greedy_text": child["text"],
                               "tokens_equal": True}  # fmt: skip
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (folder / "card_sections.json").write_text(json.dumps({"report": report}, indent=2))

    lineage_source = Path(config.model) / "forge_lineage.json"
    phase_name = json.loads(lineage_source.read_text())["phase_name"] if lineage_source.exists() else "model"
    save_phase_output(
        config.output_dir, model=model, tokenizer=tokenizer, phase=7, phase_name="export", config=asdict(config),
        inputs=[config.model], metrics={"export/checkpoint_bytes": rows[names[0]]["checkpoint_bytes"],
        "export/size_ratio_fp32_over_packed": report["size_ratio_fp32_over_packed"],
        "export/speed_ratio_packed_over_fp32": report["speed_ratio_packed_over_fp32"]},
        wall_time_s=time.time() - started, tags=["export", "edge", "cpu"], card_sections={"report": report},
        card_template="export", model_name=f"forge-final-{phase_name}", write_extras=write_extras,
        overwrite=config.overwrite, push_to_hub=config.hub_model_id if config.push_to_hub else None,
    )  # fmt: skip
    return {"output_dir": config.output_dir, "report": report}


__all__ = ["ExportConfig", "check_without_package", "dense_fp32_copy", "export_model", "packed_ternary_copy"]
