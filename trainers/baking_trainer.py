"""Prompt baking: make a model behave, without a prompt, as it behaves with it (Phases 3, 5 and 6).

    from trainers import PromptBakingConfig, bake_prompt

    baked = bake_prompt(model, tokenizer, "You are a careful assistant.", PromptBakingConfig(fraction=0.5))
    result = run_prompt_baking(model, tokenizer, prompt, config, inputs=["Question: 2+3?"])  # + KL and strength

The teacher is the base model with the prompt in context, run with the LoRA adapters **disabled**
(`PeftModel.disable_adapter()`); the student is the same model with the adapters enabled and **without** the prompt.
The teacher is frozen during a bake, so its continuations and next-token distributions are computed once, before
training, and stored as top-K log-probs (plus a tail bucket); the `PromptBakingTrainer` (a `transformers.Trainer`)
then minimises the per-token KL(teacher || student) on those continuations. The bake's strength is measured as
`1 - KL_after / KL_before` on held-out teacher continuations.

Why not TRL: `DistillationTrainer` and GKD feed teacher and student the *same* token sequence and sample from the
student, so the prompt cannot sit in the teacher's context only; the experimental `SDFTTrainer` (base teacher via a
disabled adapter plus a privileged context) is closest, but it is `trl.experimental` (no API guarantee) and samples
from the adapted student even with `generate_from_teacher=True`. Written here by hand, because no kept library does
it: the teacher-target construction (prompt only in the teacher context, continuations from the teacher) and the
top-K + tail-bucket KL. PEFT provides the adapters, the disabled-adapter teacher and the merge; Trainer the loop.

`bake_examples` reuses the same machinery for supervised baking of text targets (Phase 3 step 1): a one-hot teacher
distribution makes the KL exactly the cross-entropy of the target text.
"""

import math
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging

from .baking_config import PromptBakingConfig
from .bitnet_lora import register_bitnet_lora

logger = logging.get_logger(__name__)

TAIL_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Teacher targets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BakingExample:
    """One training sequence: the student's tokens and the teacher's distribution over each continuation token.

    `input_ids` is the student context followed by the continuation; position `target_start + j - 1` of the student
    predicts continuation token j. `target_ids`/`target_logprobs` (n, K) are the teacher's top-K token ids and
    log-probs for each of the n continuation tokens (K = 1 with log-prob 0 for a supervised text target).
    """

    input_ids: list[int]
    target_start: int
    target_ids: torch.Tensor
    target_logprobs: torch.Tensor

    @property
    def num_targets(self) -> int:
        return self.target_ids.shape[0]


class BakingDataset(Dataset):
    """A list of `BakingExample`s as a torch dataset for `Trainer`."""

    def __init__(self, examples: Sequence[BakingExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> BakingExample:
        return self.examples[index]


def collate_baking(examples: Sequence[BakingExample], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad the student sequences and the (n, K) teacher targets into a batch with masks."""
    length = max(len(e.input_ids) for e in examples)
    n_max = max(e.num_targets for e in examples)
    k = max(e.target_ids.shape[1] for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    positions = torch.zeros((batch, n_max), dtype=torch.long)
    target_ids = torch.zeros((batch, n_max, k), dtype=torch.long)
    target_logprobs = torch.full((batch, n_max, k), -math.inf)
    target_mask = torch.zeros((batch, n_max), dtype=torch.bool)
    for row, example in enumerate(examples):
        n, width = example.num_targets, example.target_ids.shape[1]
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
        positions[row, :n] = torch.arange(n) + example.target_start - 1
        target_ids[row, :n, :width] = example.target_ids
        target_logprobs[row, :n, :width] = example.target_logprobs
        target_mask[row, :n] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "target_positions": positions,
        "target_ids": target_ids,
        "target_logprobs": target_logprobs,
        "target_mask": target_mask,
    }


def forward_kwargs(model) -> dict:
    """Extra forward arguments so teacher, student and measurements use the same logits: for Forge models the final
    TRM step (ACT early exit off, as in training); nothing for other architectures."""
    return {"act_halting": False} if getattr(model.config, "model_type", None) == "forge" else {}


def context_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer's own start tokens (e.g. `<|bos|>`), never empty."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return list(ids)


def piece_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text piece without any special tokens (prompts and inputs are tokenised as pieces, so the
    teacher and student see identical continuation tokens whatever the BPE merges at the joins)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def topk_kl(student_logprobs: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher || student) over the teacher's top-K support plus one tail bucket.

    Args:
        student_logprobs: (..., V) student log-probs.
        target_ids / target_logprobs: (..., K) teacher top-K ids and log-probs (-inf marks padding slots).

    With K = V this is the exact KL; with K < V, lumping the rest of the vocabulary into one bucket gives a lower
    bound of it that is exact whenever the student matches the teacher on the top-K tokens. A one-hot teacher
    (K = 1, log-prob 0) gives the cross-entropy of the target token.
    """
    student_topk = student_logprobs.gather(-1, target_ids)  # (..., K)
    teacher_probs = target_logprobs.exp()
    valid = torch.isfinite(target_logprobs)
    terms = torch.where(valid, teacher_probs * (target_logprobs - student_topk), torch.zeros_like(student_topk))
    kl = terms.sum(-1)
    teacher_tail = (1.0 - teacher_probs.sum(-1)).clamp(min=0.0)
    if target_ids.shape[-1] < student_logprobs.shape[-1]:
        student_mass = torch.where(valid, student_topk.exp(), torch.zeros_like(student_topk)).sum(-1)
        student_tail = (1.0 - student_mass).clamp(min=TAIL_EPS)
        has_tail = teacher_tail > TAIL_EPS
        tail_term = teacher_tail * (teacher_tail.clamp(min=TAIL_EPS).log() - student_tail.log())
        kl = kl + torch.where(has_tail, tail_term, torch.zeros_like(kl))
    return kl


def student_target_logprobs(model, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    """(B, n, V) student log-probs at the positions that predict the continuation tokens."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    positions = batch["target_positions"]  # (B, n)
    logits = outputs.logits.gather(1, positions[..., None].expand(-1, -1, outputs.logits.shape[-1]))
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def _teacher_distributions(
    model, sequences: list[list[int]], starts: list[int], lengths: list[int], top_k: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher top-K ids and log-probs for each sequence's continuation (positions start .. start + n - 1)."""
    results = []
    kwargs = forward_kwargs(model)
    for begin in range(0, len(sequences), batch_size):
        chunk = range(begin, min(begin + batch_size, len(sequences)))
        length = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), length), 0, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs).logits
        for row, i in enumerate(chunk):
            positions = torch.arange(lengths[i], device=logits.device) + starts[i] - 1
            logprobs = F.log_softmax(logits[row, positions].float(), dim=-1).cpu()  # (n, V)
            if top_k and top_k < logprobs.shape[-1]:
                values, indices = logprobs.topk(top_k, dim=-1)
            else:
                indices = torch.arange(logprobs.shape[-1]).expand_as(logprobs).clone()
                values = logprobs
            results.append((indices, values))
    return results


@torch.no_grad()
def sample_teacher_targets(
    teacher,
    tokenizer,
    prompt: str,
    inputs: Sequence[str],
    num_samples: int,
    config: PromptBakingConfig,
    seed: int,
) -> list[BakingExample]:
    """Sample `num_samples` continuations from the teacher (`prompt` + input in context) and record its next-token
    distributions on them, aligned to the student's tokens (the input without the prompt).

    `teacher` runs as given: pass the base model, or the PeftModel inside `disable_adapter()`.
    """
    was_training = teacher.training
    teacher.eval()
    inputs = list(inputs) or [""]
    prompt_part = piece_ids(tokenizer, prompt + config.separator)
    start = context_ids(tokenizer, "")  # the tokenizer's own start tokens (e.g. BOS), or BOS/EOS when it adds none
    contexts = []
    for text in inputs:
        x = piece_ids(tokenizer, text)
        contexts.append((start + prompt_part + x, start + x))
    per_input = [num_samples // len(inputs) + (1 if i < num_samples % len(inputs) else 0) for i in range(len(inputs))]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = tokenizer.eos_token_id
    sequences, starts, lengths, students = [], [], [], []
    devices = [teacher.device] if teacher.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for (teacher_ctx, student_ctx), count in zip(contexts, per_input, strict=True):
                for begin in range(0, count, config.batch_size):
                    n = min(config.batch_size, count - begin)
                    ids = torch.tensor([teacher_ctx] * n, device=teacher.device)
                    generated = teacher.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=True,
                        temperature=config.temperature,
                        top_k=0,
                        top_p=1.0,
                        max_new_tokens=config.max_new_tokens,
                        pad_token_id=pad_id,
                        eos_token_id=eos_ids,
                        **forward_kwargs(teacher),
                    )[:, len(teacher_ctx) :].tolist()
                    for continuation in generated:
                        if eos_ids is not None and eos_ids in continuation:
                            continuation = continuation[: continuation.index(eos_ids) + 1]
                        if not continuation:
                            continue
                        sequences.append(teacher_ctx + continuation)
                        starts.append(len(teacher_ctx))
                        lengths.append(len(continuation))
                        students.append((student_ctx, continuation))
        targets = _teacher_distributions(teacher, sequences, starts, lengths, config.top_k_logits, config.batch_size)
    finally:
        teacher.train(was_training)
    return [
        BakingExample(student_ctx + continuation, len(student_ctx), ids, logprobs)
        for (student_ctx, continuation), (ids, logprobs) in zip(students, targets, strict=True)
    ]


def text_targets(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[BakingExample]:
    """Supervised targets: (context, continuation) text pairs as one-hot teacher distributions (KL = cross-entropy)."""
    examples = []
    for context, continuation in pairs:
        ctx = context_ids(tokenizer, context)
        cont = piece_ids(tokenizer, continuation)
        if tokenizer.eos_token_id is not None:
            cont = cont + [tokenizer.eos_token_id]
        ids = torch.tensor(cont)[:, None]
        examples.append(BakingExample(ctx + cont, len(ctx), ids, torch.zeros(ids.shape)))
    return examples


@torch.no_grad()
def measure_kl(model, examples: Sequence[BakingExample], batch_size: int = 16, pad_token_id: int = 0) -> float:
    """Mean per-token KL(teacher || model) over the continuation tokens of `examples` (eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for begin in range(0, len(examples), batch_size):
            batch = collate_baking(examples[begin : begin + batch_size], pad_token_id)
            batch = {name: value.to(model.device) for name, value in batch.items()}
            logprobs = student_target_logprobs(model, batch, **forward_kwargs(model))
            kl = topk_kl(logprobs, batch["target_ids"], batch["target_logprobs"])
            total += float(kl[batch["target_mask"]].sum())
            count += int(batch["target_mask"].sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


class PromptBakingTrainer(Trainer):
    """`Trainer` whose loss is the mean per-token KL(teacher || student) on stored teacher targets."""

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean computed here: Trainer scales it for accumulation

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Under DDP `model` is the wrapper (forward through it so gradients synchronise; read the config underneath).
        logprobs = student_target_logprobs(model, inputs, **forward_kwargs(self.accelerator.unwrap_model(model)))
        kl = topk_kl(logprobs, inputs["target_ids"], inputs["target_logprobs"])  # (B, n)
        mask = inputs["target_mask"]
        loss = kl[mask].sum() / mask.sum().clamp(min=1)
        self._metrics["bake/kl"].append(float(loss.detach()))
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update({name: sum(values) / len(values) for name, values in self._metrics.items() if values})
        self._metrics.clear()
        super().log(logs, start_time)


def _training_args(config: PromptBakingConfig, output_dir: str, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=0.0,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=config.report_to or "none",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
    )


def lora_config(config: PromptBakingConfig) -> LoraConfig:
    """The PEFT `LoraConfig` of a bake; ternary `BitLinear` targets get `BitLinearLora` adapters."""
    return register_bitnet_lora(
        LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
            trainable_token_indices=list(config.trainable_token_indices) if config.trainable_token_indices else None,
            bias="none",
        )
    )


@dataclass
class BakeRound:
    """What one round of a bake measured (KL per continuation token, on held-out teacher samples)."""

    kind: str  # "bake" (stacked rounds against the original teacher) or "pursuit"
    steps: int
    kl_before: float
    kl_after: float
    kl_to_original_after: float

    @property
    def strength(self) -> float:
        """1 - KL_after / KL_before: 0 = nothing baked, 1 = the unprompted student matches the prompted teacher."""
        return 1.0 - self.kl_after / self.kl_before if self.kl_before > 0 else 0.0


@dataclass
class BakeResult:
    """A finished bake: the model (merged, or the PeftModel) and its measurements."""

    model: PreTrainedModel | PeftModel
    rounds: list[BakeRound]
    kl_initial: float
    nominal_strength: float
    log_history: list[dict] = field(default_factory=list)

    @property
    def kl_final(self) -> float:
        return self.rounds[-1].kl_to_original_after

    @property
    def strength(self) -> float:
        """Strength against the original teacher, 1 - KL_final / KL_initial (pursuit can push it past the rounds)."""
        return 1.0 - self.kl_final / self.kl_initial if self.kl_initial > 0 else 0.0

    def metrics(self, prefix: str = "bake") -> dict[str, float]:
        """Flat metrics for `metrics.json` and the model card."""
        values = {
            f"{prefix}/kl_before": self.kl_initial,
            f"{prefix}/kl_after": self.kl_final,
            f"{prefix}/strength": self.strength,
            f"{prefix}/nominal_strength": self.nominal_strength,
        }
        for i, r in enumerate(self.rounds):
            values[f"{prefix}/round{i}_{r.kind}_strength"] = r.strength
        return values


def _train_round(model, dataset: BakingDataset, config: PromptBakingConfig, steps: int, tokenizer, seed: int):
    """One LoRA bake of `steps` steps on `dataset`; returns the PeftModel and the trainer's log history."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(config))
    output_dir = tempfile.mkdtemp(prefix="forge-bake-")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        trainer = PromptBakingTrainer(
            model=peft_model,
            args=_training_args(replace(config, seed=seed), output_dir, steps),
            train_dataset=dataset,
            data_collator=lambda examples: collate_baking(examples, pad_id),
        )
        trainer.remove_callback(PrinterCallback)  # logs go to log_history, report_to and the logger, not stdout
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return peft_model, list(trainer.state.log_history)


def _bake_rounds(model, tokenizer, make_targets, config: PromptBakingConfig, pursuit_targets=None) -> BakeResult:
    """Shared driver of prompt and supervised bakes: stacked rounds against the first teacher, then pursuit."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train, held_out = make_targets(model, config.seed)
    if not train or not held_out:
        raise ValueError("The teacher produced no continuations. Fix: raise max_new_tokens or check the EOS token.")
    kl_initial = measure_kl(model, held_out, config.batch_size, pad_id)
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    rounds, history = [], []
    total = config.stack + config.pursuit_rounds
    for index in range(total):
        pursuit = index >= config.stack
        if pursuit:  # the teacher is now the baked model with the prompt
            train, round_held_out = pursuit_targets(model, config.seed + 1000 * index)
            steps = config.steps
        else:
            round_held_out = held_out
            steps = config.round_steps
        kl_before = measure_kl(model, round_held_out, config.batch_size, pad_id)
        peft_model, logs = _train_round(model, BakingDataset(train), config, steps, tokenizer, config.seed + index)
        history.extend({**entry, "round": index} for entry in logs)
        kl_after = measure_kl(peft_model, round_held_out, config.batch_size, pad_id)
        kl_original = kl_after if not pursuit else measure_kl(peft_model, held_out, config.batch_size, pad_id)
        rounds.append(BakeRound("pursuit" if pursuit else "bake", steps, kl_before, kl_after, kl_original))
        logger.info(
            "Bake round %d/%d (%s, %d steps): KL %.4f -> %.4f, strength %.3f",
            index + 1,
            total,
            rounds[-1].kind,
            steps,
            kl_before,
            kl_after,
            rounds[-1].strength,
        )
        if config.output == "adapter":
            model = peft_model
        else:
            model = peft_model.merge_and_unload()
            for name, param in model.named_parameters():  # PEFT froze the base weights; hand them back trainable
                param.requires_grad_(trainable.get(name, True))
    return BakeResult(model, rounds, kl_initial, config.nominal_strength, history)


def run_prompt_baking(
    model: PreTrainedModel,
    tokenizer,
    prompt: str,
    config: PromptBakingConfig | None = None,
    inputs: Sequence[str] = ("",),
) -> BakeResult:
    """Bake `prompt` into `model` (modified in place) and return the result with its KL measurements.

    `inputs` are the texts the prompt precedes (questions, user turns); the teacher sees `prompt + separator +
    input`, the student only `input`, and both continue with the teacher's sampled continuation.
    """
    config = config or PromptBakingConfig()
    if not prompt:
        raise ValueError("bake_prompt got an empty prompt. Fix: pass the text to bake in.")

    def targets(teacher, seed: int) -> tuple[list[BakingExample], list[BakingExample]]:
        if isinstance(teacher, PeftModel):  # the teacher is the base model: adapters off
            with teacher.disable_adapter():
                return targets(teacher.get_base_model(), seed)
        train = sample_teacher_targets(teacher, tokenizer, prompt, inputs, config.num_samples, config, seed)
        held_out = sample_teacher_targets(teacher, tokenizer, prompt, inputs, config.eval_samples, config, seed + 1)
        return train, held_out

    return _bake_rounds(model, tokenizer, targets, config, pursuit_targets=targets)


def bake_prompt(
    model: PreTrainedModel,
    tokenizer,
    prompt: str,
    config: PromptBakingConfig | None = None,
    inputs: Sequence[str] = ("",),
) -> PreTrainedModel | PeftModel:
    """Bake `prompt` into `model`; returns the merged model (`config.output="merged"`) or the PeftModel adapter."""
    return run_prompt_baking(model, tokenizer, prompt, config, inputs).model


def bake_examples(
    model: PreTrainedModel,
    tokenizer,
    train_pairs: Sequence[tuple[str, str]],
    held_out_pairs: Sequence[tuple[str, str]],
    config: PromptBakingConfig | None = None,
) -> BakeResult:
    """Supervised baking: LoRA-train `model` to continue each context with its target text (one-hot teacher), merge.

    The KL it reports is the per-token cross-entropy of `held_out_pairs` before and after.
    """
    config = config or PromptBakingConfig()
    if config.pursuit_rounds:
        raise ValueError("bake_examples has a fixed text teacher. Fix: set pursuit_rounds=0.")
    train, held_out = text_targets(tokenizer, train_pairs), text_targets(tokenizer, held_out_pairs)
    return _bake_rounds(model, tokenizer, lambda _model, _seed: (train, held_out), config)


__all__ = [
    "BakeResult",
    "BakeRound",
    "BakingDataset",
    "BakingExample",
    "PromptBakingTrainer",
    "bake_examples",
    "bake_prompt",
    "collate_baking",
    "lora_config",
    "measure_kl",
    "run_prompt_baking",
    "sample_teacher_targets",
    "text_targets",
    "topk_kl",
]
