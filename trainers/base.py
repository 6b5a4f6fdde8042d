"""What every Forge trainer shares: the model's diagnostics logged through `Trainer.log`.

Phase trainers subclass `ForgeTrainer` (itself a plain `transformers.Trainer`), so loss parts, per-step losses,
ACT halting and gate usage reach every `report_to` backend under the specification's metric names.
"""

from collections import defaultdict

import torch
from transformers import Trainer
from transformers.utils import logging

logger = logging.get_logger(__name__)


def forge_metrics(outputs) -> dict[str, float]:
    """Scalar diagnostics of one `ForgeCausalLMOutputWithPast` (names follow the specification)."""
    metrics: dict[str, float] = {}
    for name, key in (("loss/lm", "lm_loss"), ("loss/act", "act_loss"), ("gate/entropy", "gate_entropy")):
        value = getattr(outputs, key, None)
        if value is not None:
            metrics[name] = float(value)
    step_losses = getattr(outputs, "step_losses", None)
    if step_losses is not None:
        for step, value in enumerate(step_losses.tolist()):
            metrics[f"loss/step_{step}"] = value
    step_accuracies = getattr(outputs, "step_accuracies", None)
    if step_accuracies is not None:
        for step, value in enumerate(step_accuracies.tolist()):
            metrics[f"act/acc_step{step}"] = value
    halt_steps = getattr(outputs, "halt_steps", None)
    if halt_steps is not None:
        metrics["act/avg_steps"] = float(halt_steps.float().mean())
    halting_probs = getattr(outputs, "halting_probs", None)
    if halting_probs is not None:
        metrics["act/halt_prob_step0"] = float(halting_probs[..., 0].mean())
    gate_means = getattr(outputs, "gate_means", None)
    if gate_means is not None:
        metrics["gate/m_usage"] = float(1.0 - gate_means.mean())
    return metrics


class ForgeTrainer(Trainer):
    """`Trainer` that records each forward's Forge diagnostics and logs their mean over the logging window."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = {mode: defaultdict(list) for mode in ("train", "eval")}  # mode -> name -> values

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError(
                f"The model returned no loss; the batch has keys {sorted(inputs)}. Fix: the data collator must "
                "provide `labels` (e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False))."
            )
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            for name, value in forge_metrics(outputs).items():
                self._metrics[mode][name].append(value)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            averaged = {f"eval_{name}": value for name, value in averaged.items()}
        logs = {**logs, **averaged}
        self._metrics[mode].clear()
        super().log(logs, start_time)


__all__ = ["ForgeTrainer", "forge_metrics"]
