"""Phase 4 (BitNet b1.58): ternary weights by layer-by-layer quantization with fallback, STE fine-tuning, packing.

`run_phase4(config)` loads the previous phase's folder, measures the full-precision model, quantizes the chosen
linear layers one at a time (a layer whose quantization raises the calibration loss beyond
`sensitivity_threshold` goes back to full precision and is reported), fine-tunes the ternary model's shadow weights
with MuGrokfast in STE mode (`BitNetTrainer`: the model's loss plus, optionally, KL distillation from the
full-precision model), packs it to 2 bits per weight and writes the phase folder with `bitnet_report.json` (bytes
per component measured from the written file, compression ratios, sparsity, per-layer error, quality before and
after, decode speed) and `plots/`. `recipes/phase4.py` is its command line.
"""

import copy
import dataclasses
import json
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed
from transformers.utils import logging

from evaluation.corpus import corpus_texts
from evaluation.perplexity import perplexity
from hub_cards import line_plot
from modeling_forge.bitnet import (
    BitLinear,
    BitNetLayout,
    bitnet_candidates,
    convert_to_bitnet,
    pack_bitnet,
    quantize_module,
    restore_module,
    set_bitnet_kernel,
    snap_embedding,
)

from .base import ForgeTrainer
from .bitnet_config import BitNetConfig
from .checkpointing import finished_output, last_complete_checkpoint, remove_work_dir
from .data import CurriculumStage, build_curriculum, source_blocks
from .inputs import check_checkpoint_folder
from .phase_output import save_phase_output
from .size_aware import size_defaults

logger = logging.get_logger(__name__)

REPORT_FILE = "bitnet_report.json"
HEATMAP_FILE = "plots/bitnet_layers.png"
EMBEDDING_CHOICES = (32, 16, 8, 4)  # from the highest precision down, for `choose_embedding_bits`


# ----------------------------------------------------------------------------------------------------------------
# STE fine-tuning with distillation
# ----------------------------------------------------------------------------------------------------------------


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the next-token distributions, summed over label positions and divided by
    `num_items_in_batch` (Trainer's accumulated label count) or this batch's label count, like the model's loss."""
    valid = F.pad(labels, (0, 1), value=-100)[..., 1:] != -100  # (B, T): positions that predict a label
    student = F.log_softmax(student_logits[valid].float() / temperature, dim=-1)  # (N, V)
    teacher = F.log_softmax(teacher_logits[valid].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature**2
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(valid.sum()), 1)
    return kl / torch.as_tensor(denominator, device=kl.device, dtype=kl.dtype)


class BitNetTrainer(ForgeTrainer):
    """`ForgeTrainer` for STE fine-tuning: `loss = (1 - alpha) * model loss + alpha * KL(teacher || student)` when a
    full-precision `teacher` is given (logged as `loss/distill_kl` and `loss/model`)."""

    def __init__(
        self, *args, teacher: torch.nn.Module | None = None, distill_weight: float = 0.0,
        distill_temperature: float = 1.0, **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval() if teacher is not None else None  # used under no_grad
        self.distill_weight = distill_weight if teacher is not None else 0.0
        self.distill_temperature = distill_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.distill_weight > 0 and model.training:
            with torch.no_grad():  # the teacher's final recursion step, as the student's training logits
                teacher_logits = self.teacher(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), act_halting=False
                ).logits
            kl = distillation_kl(outputs.logits, teacher_logits, inputs["labels"], self.distill_temperature,
                                 num_items_in_batch)  # fmt: skip
            self._metrics["train"]["loss/model"].append(float(loss.detach()))
            self._metrics["train"]["loss/distill_kl"].append(float(kl.detach()))
            loss = (1.0 - self.distill_weight) * loss + self.distill_weight * kl
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------
# Data, losses and quality
# ----------------------------------------------------------------------------------------------------------------


def mixture_blocks(
    tokenizer, mixture: dict[str, float], *, n_blocks: int, block_size: int, split: str, seed: int,
    difficulty: Sequence[int],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per source with positive weight: (n, 2, block) tensors of [input_ids, labels] (n in proportion to weight)."""
    total = sum(mixture.values())
    out = {}
    for source, weight in mixture.items():
        if weight <= 0:
            continue
        count = max(1, round(n_blocks * weight / total))
        blocks = source_blocks(source, tokenizer, block_size=block_size, n_blocks=count, split=split, seed=seed,
                               difficulty=tuple(difficulty))  # fmt: skip
        out[source] = torch.tensor([[ids, labels] for ids, labels in blocks])
    return out


@torch.no_grad()
def block_metrics(model, blocks: torch.Tensor, batch_size: int = 8) -> tuple[float, float, int]:
    """(summed next-token cross-entropy, correct predictions, scored tokens) of eval-mode logits on (n, 2, T)."""
    was_training = model.training
    model.eval()
    nll = correct = count = 0.0
    device = next(model.parameters()).device
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        ids, labels = batch[:, 0], batch[:, 1]
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        targets = labels[:, 1:]
        mask = targets != -100
        nll += float(F.cross_entropy(logits[mask], targets[mask], reduction="sum"))
        correct += float((logits[mask].argmax(-1) == targets[mask]).sum())
        count += int(mask.sum())
    model.train(was_training)
    return nll, correct, int(count)


def calibration_loss(model, calibration: dict[str, torch.Tensor]) -> float:
    """Mean next-token cross-entropy over all calibration blocks (what layer-by-layer validation compares)."""
    nll = count = 0.0
    for blocks in calibration.values():
        source_nll, _, source_count = block_metrics(model, blocks)
        nll, count = nll + source_nll, count + source_count
    return nll / max(count, 1)


def evaluate_quality(model, tokenizer, eval_sets: dict[str, torch.Tensor], config: BitNetConfig) -> dict:
    """Rolling perplexity on the corpus validation split, and loss / next-token accuracy per validation source."""
    result = {"per_source": {}}
    nll = correct = count = 0.0
    for source, blocks in eval_sets.items():
        s_nll, s_correct, s_count = block_metrics(model, blocks)
        result["per_source"][source] = {"loss": s_nll / s_count, "token_accuracy": s_correct / s_count}
        nll, correct, count = nll + s_nll, correct + s_correct, count + s_count
    result["loss"] = nll / count
    result["token_accuracy"] = correct / count
    ppl = perplexity(model, tokenizer, corpus_texts("validation"), max_length=2 * config.block_size,
                     stride=config.block_size, max_tokens=config.eval_tokens)  # fmt: skip
    result["perplexity"] = ppl.perplexity
    result["perplexity_tokens"] = ppl.n_tokens
    return result


# ----------------------------------------------------------------------------------------------------------------
# Layer-by-layer quantization with fallback
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def layer_statistics(layer: BitLinear) -> dict:
    """Share of zero weights and relative quantization error ||W - s*T(W)||_F / ||W||_F of a shadow BitLinear."""
    w_int, _ = layer.quantized()
    weight = layer.weight.detach().float()
    error = float((weight - layer.dequantized_weight()).norm() / weight.norm().clamp(min=1e-12))
    return {"parameters": weight.numel(), "sparsity": float((w_int == 0).float().mean()), "quant_error": error}


def layerwise_quantize(
    model, names: Sequence[str], calibration: dict[str, torch.Tensor], threshold: float | None,
    activation_bits: int = 8,
) -> dict:  # fmt: skip
    """Quantize `names` one at a time in order, measuring the calibration loss after each; a layer whose relative
    loss increase over the previous accepted state exceeds `threshold` is restored to full precision ("fallback").
    `threshold=None` accepts every layer (still measured). Returns the per-layer records and the accepted names."""
    records, accepted = [], []
    current = calibration_loss(model, calibration)
    start = current
    for name in names:
        original = model.base_model.get_submodule(name)
        layer = quantize_module(model, name, activation_bits)
        loss = calibration_loss(model, calibration)
        delta = (loss - current) / current
        record = {"name": name, **layer_statistics(layer), "loss_before": current, "loss_after": loss,
                  "relative_increase": delta}  # fmt: skip
        if threshold is not None and delta > threshold:
            restore_module(model, name, original)
            record["status"] = "fallback"
            logger.info("Phase 4: %s stays in full precision (loss +%.2f%% > %.2f%%)", name, 100 * delta,
                        100 * threshold)  # fmt: skip
        else:
            record["status"] = "ternary"
            accepted.append(name)
            current = loss
        records.append(record)
    return {"layers": records, "accepted": accepted, "loss_start": start, "loss_end": current}


# ----------------------------------------------------------------------------------------------------------------
# Storage accounting
# ----------------------------------------------------------------------------------------------------------------


def embedding_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Stored bytes of a (rows, cols) embedding at `bits` (codes plus fp16 group scales)."""
    if bits in (32, 16):
        return rows * cols * bits // 8
    return rows * cols * bits // 8 + rows * (cols // group_size) * 2


def projected_checkpoint_bytes(model, ternary: Sequence[str], embedding_bits: int, group_size: int) -> int:
    """Tensor bytes of the packed checkpoint if `ternary` layers were packed and the embedding stored at
    `embedding_bits` (everything else at its dtype; a tied LM head counted once)."""
    backbone = model.base_model
    ternary_weights = {id(backbone.get_submodule(name).weight) for name in ternary}
    embedding = backbone.embed_tokens.weight
    total = 0
    for _, param in model.named_parameters():  # deduplicated: a tied head is the embedding
        if param is embedding:
            total += embedding_bytes(*param.shape, embedding_bits, group_size)
        elif id(param) in ternary_weights:
            rows, cols = param.shape
            total += -(-rows // 4) * cols + 4  # 2-bit packed rows + the fp32 scale
        else:
            total += param.numel() * param.element_size()
    return total


def choose_embedding_bits(model, ternary: Sequence[str], target: float, group_size: int) -> tuple[int, dict]:
    """The highest embedding precision whose projected checkpoint reaches `target` x smaller than fp32 (else the
    lowest), and the projected ratio of every choice."""
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    hidden = model.config.hidden_size
    choices = [b for b in EMBEDDING_CHOICES if b >= 16 or hidden % group_size == 0]
    ratios = {b: fp32 / projected_checkpoint_bytes(model, ternary, b, group_size) for b in choices}
    for bits in choices:
        if ratios[bits] >= target:
            return bits, ratios
    return choices[-1], ratios


def safetensors_sizes(path: str | Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, read from its header (8-byte length, then JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def checkpoint_breakdown(folder: str | Path) -> dict:
    """Bytes per component of a saved checkpoint: ternary linears (packed weights + scales), full-precision linears,
    embedding (codes + scales, or fp), LM head (if untied), other (norms, biases); plus the file size."""
    folder = Path(folder)
    components = {"ternary_linears": 0, "full_precision_linears": 0, "embedding": 0, "lm_head": 0, "other": 0}
    for path in sorted(folder.glob("*.safetensors")):
        for key, size in safetensors_sizes(path).items():
            if ".embed_tokens." in key or key.startswith("embed_tokens."):
                components["embedding"] += size
            elif key.startswith("lm_head."):
                components["lm_head"] += size
            elif key.endswith((".weight_packed", ".weight_scale")):
                components["ternary_linears"] += size
            elif key.endswith(".weight") and not key.endswith(("norm.weight", "layernorm.weight")):
                components["full_precision_linears"] += size
            else:
                components["other"] += size
    file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"components": components, "tensor_bytes": sum(components.values()), "file_bytes": file_bytes}


def measure_checkpoint(model) -> dict:
    """`checkpoint_breakdown` of `model.save_pretrained` in a temporary folder (the bytes the phase will write)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return checkpoint_breakdown(folder)


# ----------------------------------------------------------------------------------------------------------------
# Speed and plots
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, pad_token_id: int | None) -> float:
    """Greedy `generate` throughput (new tokens / s, cached decoding) after one warm-up call."""
    model.eval()
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": pad_token_id}  # fmt: skip
    model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    started = time.perf_counter()
    model.generate(prompt, **kwargs)
    return prompt.shape[0] * new_tokens / (time.perf_counter() - started)


def compare_decode_speed(models: dict, prompt: torch.Tensor, new_tokens: int, pad_token_id, repeats: int = 3) -> dict:
    """Median tokens/s per model, measured in alternation (shared machines drift; alternating keeps it fair)."""
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(decode_tokens_per_second(model, prompt, new_tokens, pad_token_id))
    return {name: sorted(values)[len(values) // 2] for name, values in runs.items()}


COLUMNS = (
    ("q_proj", r"self_attn.q_proj"), ("k_proj", r"self_attn.k_proj"), ("v_proj", r"self_attn.v_proj"),
    ("o_proj", r"self_attn.o_proj"), ("mem.down", r"memory.down_proj"), ("mem.up", r"memory.up_proj"),
    ("mem.q", r"memory.q_proj"), ("mem.k", r"memory.k_proj"), ("mem.v", r"memory.v_proj"),
    ("mem.g", r"memory.g_proj"), ("mem.o", r"memory.o_proj"),
    ("gate.fc1", r"gate.fc1"), ("gate.fc2", r"gate.fc2"), ("mlp.gate", r"mlp.gate_proj"), ("mlp.up", r"mlp.up_proj"),
    ("mlp.down", r"mlp.down_proj"), ("z_init", r"refiner.z_init"), ("y_init", r"refiner.y_init"),
    ("trm.gate", r"block.gate_proj"), ("trm.up", r"block.up_proj"), ("trm.down", r"block.down_proj"),
)  # fmt: skip


def bitnet_heatmap(path: str | Path, records: Sequence[dict], num_layers: int) -> Path:
    """Two heatmaps (rows: decoder layers and the TRM refiner; columns: projections): share of zero weights and
    relative quantization error; full-precision fallbacks are marked "FP"."""
    import matplotlib.pyplot as plt  # hub_cards (imported above) selected the Agg backend

    rows = [f"layer {i}" for i in range(num_layers)] + ["TRM"]
    grids = {key: torch.full((len(rows), len(COLUMNS)), float("nan")) for key in ("sparsity", "quant_error")}
    fallback = []
    for record in records:
        name = record["name"]
        row = len(rows) - 1 if name.startswith("recursion.") else int(name.split(".")[1])
        col = next(i for i, (_, suffix) in enumerate(COLUMNS) if name.endswith(suffix))
        for key, grid in grids.items():
            grid[row, col] = record[key]
        if record["status"] == "fallback":
            fallback.append((row, col))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2, figsize=(13, 1.6 + 0.45 * len(rows)), dpi=100)
    titles = {"sparsity": "share of zero weights", "quant_error": "relative quantization error"}
    for axis, (key, grid) in zip(axes, grids.items(), strict=True):
        image = axis.imshow(grid.numpy(), cmap="viridis", aspect="auto")
        axis.set_title(titles[key])
        axis.set_xticks(range(len(COLUMNS)), [label for label, _ in COLUMNS], rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(len(rows)), rows, fontsize=8)
        for row, col in fallback:
            axis.text(col, row, "FP", ha="center", va="center", color="red", fontsize=8, fontweight="bold")
        figure.colorbar(image, ax=axis, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The phase
# ----------------------------------------------------------------------------------------------------------------


def _relative_drop(after: float, before: float, higher_is_better: bool) -> float:
    return (before - after) / before if higher_is_better else (after - before) / before


def run_phase4(config: BitNetConfig) -> dict:
    """Run Phase 4 end to end and return a summary (the report plus where it was written)."""
    state = PartialState(cpu=config.use_cpu)  # as the Trainer below will (gloo on CPU)
    started = time.time()
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    if finished_output(output_dir) and config.resume and not config.overwrite:
        logger.info("Phase 4 already finished at %s; nothing to resume.", output_dir)
        report = json.loads((output_dir / REPORT_FILE).read_text())
        return {"output_dir": str(output_dir), "report": report if state.is_main_process else None,
                "resumed_finished": True}  # fmt: skip
    if output_dir.exists() and not config.overwrite:
        raise FileExistsError(f"{output_dir} already holds a finished Phase 4. Fix: choose another output_dir, pass "
                              "--resume to keep it, or --overwrite.")  # fmt: skip

    check_checkpoint_folder(config.model_name_or_path)  # a cut or foreign folder fails here, naming the file and fix
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path or config.model_name_or_path)
    check_checkpoint_folder(config.model_name_or_path, tokenizer=tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32).eval()
    if teacher.config.model_type != "forge":
        raise ValueError(f"{config.model_name_or_path} is a {teacher.config.model_type!r} model. Fix: Phase 4 "
                         "takes a Forge checkpoint (a previous phase's output).")  # fmt: skip
    if teacher.config.bitnet is not None:
        raise ValueError(f"{config.model_name_or_path} is already a BitNet checkpoint. Fix: pass the full-precision "
                         "output of the previous phase.")  # fmt: skip
    n_params = teacher.num_parameters()
    defaults = size_defaults(n_params)
    filled = config.resolve_size_defaults(defaults)
    logger.info("Phase 4: %d parameters (%s band); size-aware defaults used for %s", n_params, defaults.band, filled)

    # Data: calibration (train split), held-out evaluation (validation split).
    difficulty = config.task_difficulty
    calibration = mixture_blocks(tokenizer, config.data_mixture, n_blocks=config.calibration_blocks,
                                 block_size=config.block_size, split="train", seed=config.seed + 1,
                                 difficulty=difficulty)  # fmt: skip
    eval_sets = {
        source: mixture_blocks(tokenizer, {source: 1.0}, n_blocks=config.eval_blocks, block_size=config.block_size,
                               split="validation", seed=0, difficulty=difficulty)[source]
        for source, weight in config.data_mixture.items() if weight > 0
    }  # fmt: skip
    quality = {"full_precision": evaluate_quality(teacher, tokenizer, eval_sets, config)}

    # 1. Post-training quantization, layer by layer with fallback.
    student = copy.deepcopy(teacher)
    candidates = [n for n in bitnet_candidates(student, config.quantize_groups) if n not in config.keep_full_precision]
    embedding_bits, projected = config.embedding_bits, {}
    if embedding_bits is None:
        embedding_bits, projected = choose_embedding_bits(student, candidates, config.compression_target,
                                                          config.embedding_group_size)  # fmt: skip
    snap_embedding(student, embedding_bits, config.embedding_group_size)
    embedding_loss = calibration_loss(student, calibration)
    base_loss = calibration_loss(teacher, calibration)
    ptq = layerwise_quantize(student, candidates, calibration,
                             config.sensitivity_threshold if config.layerwise_validation else None,
                             config.activation_bits)  # fmt: skip
    embedding_bits_first = embedding_bits
    if config.embedding_bits is None and ptq["accepted"] != candidates:
        # Fallback layers stay fp32, so the choice made before them may now miss the target: choose again with the
        # accepted layers (coarser only; the PTQ quality below is measured after this re-snap).
        bits, projected = choose_embedding_bits(student, ptq["accepted"], config.compression_target,
                                                config.embedding_group_size)  # fmt: skip
        if bits < embedding_bits:
            fallbacks = len(candidates) - len(ptq["accepted"])
            logger.info("Phase 4: %d fallback layer(s); embedding bits lowered %d -> %d to meet %.1fx", fallbacks,
                        embedding_bits, bits, config.compression_target)  # fmt: skip
            embedding_bits = bits
            snap_embedding(student, embedding_bits, config.embedding_group_size)
    layout = BitNetLayout(modules=ptq["accepted"], activation_bits=config.activation_bits,
                          embedding_bits=embedding_bits, embedding_group_size=config.embedding_group_size)  # fmt: skip
    convert_to_bitnet(student, layout)
    quality["post_training_quantization"] = evaluate_quality(student, tokenizer, eval_sets, config)

    # 2. STE fine-tuning of the shadow weights (MuGrokfast in STE mode), distilling from the full-precision model.
    work_dir = output_dir.parent / f".{output_dir.name}-work"
    train_logs: list[dict] = []
    if config.max_steps > 0:
        args = dataclasses.replace(config, output_dir=str(work_dir), push_to_hub=False, hub_model_id=None)
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * state.num_processes
        stage = CurriculumStage(name="ste", end=1.0, seq_len=config.block_size, mixture=config.data_mixture,
                                difficulty=tuple(difficulty))  # fmt: skip
        train = build_curriculum([stage], tokenizer, max_steps=config.max_steps, global_batch_size=global_batch,
                                 seed=config.seed)  # fmt: skip
        trainer = BitNetTrainer(
            model=student, args=args, train_dataset=train.dataset, data_collator=default_data_collator,
            teacher=teacher if config.distill_weight > 0 else None, distill_weight=config.distill_weight,
            distill_temperature=config.distill_temperature,
        )  # fmt: skip
        checkpoint = config.resume_from_checkpoint
        if checkpoint is None and config.resume:
            checkpoint = last_complete_checkpoint(work_dir)  # one cut by a kill is removed, not resumed from
        trainer.train(resume_from_checkpoint=checkpoint)  # PTQ above is deterministic
        student = trainer.model
        train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]

    # 3. Pack to 2 bits, measure, write.
    pack_bitnet(student, kernel=config.kernel)
    kernel = set_bitnet_kernel(student, config.kernel)  # checks the kernel's requirements; what "auto" chose
    student.eval()
    summary = {"output_dir": str(output_dir)}
    if state.is_main_process:
        quality["bitnet"] = evaluate_quality(student, tokenizer, eval_sets, config)
        storage = measure_checkpoint(student)
        input_bytes = measure_checkpoint(teacher)
        speed = {}
        if config.speed_new_tokens > 0:
            prompt = eval_sets[next(iter(eval_sets))][0, 0, :16][None]
            tps = compare_decode_speed({"fp32": teacher, "packed": student}, prompt, config.speed_new_tokens,
                                       tokenizer.pad_token_id)  # fmt: skip
            speed = {"fp32_tokens_per_s": tps["fp32"], "packed_tokens_per_s": tps["packed"],
                     "packed_vs_fp32": tps["packed"] / tps["fp32"], "batch_size": 1,
                     "new_tokens": config.speed_new_tokens, "kernel": kernel,
                     "threads": torch.get_num_threads()}  # fmt: skip
        report = _report(config, defaults, filled, n_params, ptq, (embedding_bits_first, embedding_bits), projected,
                         base_loss,
                         embedding_loss, quality, storage, input_bytes, speed, train_logs)  # fmt: skip
        _save(config, output_dir, student, tokenizer, report, train_logs, time.time() - started)
        summary.update(report=report, wall_time_s=time.time() - started)
        remove_work_dir(work_dir)
    state.wait_for_everyone()
    return summary


def _report(config, defaults, filled, n_params, ptq, embedding_choice, projected, base_loss, embedding_loss,
            quality, storage, input_bytes, speed, train_logs) -> dict:  # fmt: skip
    """The `bitnet_report.json` content; every number here was measured in this run."""
    embedding_bits_first, embedding_bits = embedding_choice
    layers = ptq["layers"]
    ternary = [r for r in layers if r["status"] == "ternary"]
    ternary_params = sum(r["parameters"] for r in ternary)
    fp = quality["full_precision"]
    file_bytes = storage["file_bytes"]
    drops = {
        stage: {
            "perplexity_increase": _relative_drop(quality[stage]["perplexity"], fp["perplexity"], False),
            "token_accuracy_drop": _relative_drop(quality[stage]["token_accuracy"], fp["token_accuracy"], True),
        }
        for stage in ("post_training_quantization", "bitnet")
    }
    return {
        "input": config.model_name_or_path,
        "parameters": n_params,
        "size_defaults": dataclasses.asdict(defaults),
        "filled_from_size_defaults": filled,
        "storage": {
            "components_bytes": storage["components"],
            "checkpoint_file_bytes": file_bytes,
            "input_checkpoint_file_bytes": input_bytes["file_bytes"],
            "fp32_bytes": n_params * 4,
            "fp16_bytes": n_params * 2,
            "compression_vs_fp32": n_params * 4 / file_bytes,
            "compression_vs_fp16": n_params * 2 / file_bytes,
            "compression_vs_input_file": input_bytes["file_bytes"] / file_bytes,
            "compression_target": config.compression_target,
            "target_met": n_params * 4 / file_bytes >= config.compression_target,
            "embedding_bits": embedding_bits,
            "embedding_bits_before_fallbacks": embedding_bits_first,
            "embedding_bits_projected_ratios": {str(k): v for k, v in projected.items()},
        },
        "ternary": {
            "layers": len(ternary),
            "fallback_layers": [r["name"] for r in layers if r["status"] == "fallback"],
            "parameters": ternary_params,
            "share_of_parameters": ternary_params / n_params,
            "sparsity": sum(r["sparsity"] * r["parameters"] for r in ternary) / max(ternary_params, 1),
            "sensitivity_threshold": config.sensitivity_threshold if config.layerwise_validation else None,
        },
        "calibration": {
            "full_precision_loss": base_loss,
            "after_embedding_loss": embedding_loss,
            "after_layers_loss": ptq["loss_end"],
        },  # fmt: skip
        "layers": layers,
        "quality": {**quality, "relative_change_vs_full_precision": drops},
        "speed": speed,
        "fine_tuning": {
            "steps": config.max_steps,
            "learning_rate": config.learning_rate,
            "distill_weight": config.distill_weight,
            "first_logged_loss": train_logs[0]["loss"] if train_logs else None,
            "last_logged_loss": train_logs[-1]["loss"] if train_logs else None,
        },
    }


def _save(config: BitNetConfig, output_dir: Path, model, tokenizer, report: dict, train_logs, wall_time) -> None:
    q, storage, ternary = report["quality"], report["storage"], report["ternary"]
    fp, ptq, final = q["full_precision"], q["post_training_quantization"], q["bitnet"]
    metrics = {
        "eval/perplexity": final["perplexity"],
        "eval/token_accuracy": final["token_accuracy"],
        "eval/loss": final["loss"],
        "eval/full_precision_perplexity": fp["perplexity"],
        "eval/ptq_perplexity": ptq["perplexity"],
        "eval/full_precision_token_accuracy": fp["token_accuracy"],
        "eval/ptq_token_accuracy": ptq["token_accuracy"],
        "bitnet/compression_vs_fp32": storage["compression_vs_fp32"],
        "bitnet/compression_vs_fp16": storage["compression_vs_fp16"],
        "bitnet/checkpoint_bytes": storage["checkpoint_file_bytes"],
        "bitnet/sparsity": ternary["sparsity"],
        "bitnet/ternary_share_of_parameters": ternary["share_of_parameters"],
        "bitnet/fallback_layers": len(ternary["fallback_layers"]),
    }
    if report["speed"]:
        metrics["speed/fp32_tokens_per_s"] = report["speed"]["fp32_tokens_per_s"]
        metrics["speed/packed_tokens_per_s"] = report["speed"]["packed_tokens_per_s"]
    eval_results = [
        {"dataset": "agent-forge/shakespeare", "split": "validation", "metric": "perplexity",
         "value": final["perplexity"]},
        {"dataset": "agent-forge/mixture", "split": "validation", "metric": "accuracy", "metric_name":
         "next-token accuracy", "value": final["token_accuracy"]},
    ]  # fmt: skip

    def write_extras(folder: Path) -> None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
        bitnet_heatmap(folder / HEATMAP_FILE, report["layers"], model.config.num_hidden_layers)
        if train_logs:
            series = {"loss": ([e["step"] for e in train_logs], [e["loss"] for e in train_logs])}
            if all("loss/distill_kl" in e for e in train_logs):
                series["distill KL"] = ([e["step"] for e in train_logs], [e["loss/distill_kl"] for e in train_logs])
            line_plot(folder / "plots" / "ste_loss.png", series, title="Phase 4: STE fine-tuning",
                      xlabel="optimizer step", ylabel="nats")  # fmt: skip
            (folder / "training_log.json").write_text(json.dumps(train_logs, indent=2))

    save_phase_output(
        output_dir, model=model, tokenizer=tokenizer, phase=4, phase_name="bitnet",
        config={"bitnet": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
                "model_bitnet": model.config.bitnet},
        inputs=[config.model_name_or_path], metrics=metrics, eval_results=eval_results, seed=config.seed,
        wall_time_s=wall_time, datasets=sorted(config.data_mixture), tags=["bitnet", "ternary", "1.58-bit"],
        card_sections={"report": report}, card_template="phase4_bitnet",
        model_name=f"forge-phase4-bitnet-{Path(config.model_name_or_path).name}", write_extras=write_extras,
        overwrite=config.overwrite,
        push_to_hub=(config.hub_model_id or f"{output_dir.parent.name}-phase4") if config.push_to_hub else None,
        hub_token=config.hub_token, hub_private=config.hub_private_repo,
    )  # fmt: skip


__all__ = [
    "BitNetTrainer",
    "bitnet_heatmap",
    "block_metrics",
    "calibration_loss",
    "checkpoint_breakdown",
    "choose_embedding_bits",
    "compare_decode_speed",
    "distillation_kl",
    "evaluate_quality",
    "layerwise_quantize",
    "measure_checkpoint",
    "mixture_blocks",
    "projected_checkpoint_bytes",
    "run_phase4",
    "safetensors_sizes",
]
