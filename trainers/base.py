"""What every Forge trainer shares: the model's diagnostics logged through `Trainer.log`, and the optimizer.

Phase trainers subclass `ForgeTrainer` (itself a plain `transformers.Trainer`), so loss parts, per-step losses,
ACT halting and gate usage reach every `report_to` backend under the specification's metric names. With
`ForgeTrainingArguments` (phase configs subclass it) the trainer builds MuGrokfast (or plain Muon, or Trainer's
AdamW) and wires QK-clip: on QK-clip steps it asks the model for `attention_logit_max` and hands it to the optimizer.
"""

from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .control import ControlCallback
from .mugrokfast import (
    MuGrokfast,
    MuGrokfastCallback,
    MuGrokfastConfig,
    create_mugrokfast,
    muon_only,
    unwrap_optimizer,
)

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


OPTIMIZER_TYPES = ("mugrokfast", "muon", "adamw")
# MuGrokfastConfig field -> the ForgeTrainingArguments field that sets it (for error messages)
OPTIMIZER_ARGUMENTS = {"lr": "learning_rate", "weight_decay": "weight_decay", "fallback_lr": "fallback_lr",
                       "grokfast_alpha": "grokfast_alpha", "grokfast_lambda": "grokfast_lambda",
                       "qk_clip_tau": "qk_clip_tau", "ste_mode": "ste_mode",
                       "metrics_interval": "optim_metrics_interval"}  # fmt: skip
TRAINER_DEFAULT_LR = 5e-5  # TrainingArguments' own default, kept for optimizer_type="adamw"


@dataclass
class ForgeTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the optimizer choice; `learning_rate` and `weight_decay` default to the preset's."""

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate (of the Muon group for mugrokfast/muon). Default: the mugrokfast_phase "
            "preset's lr (else MuGrokfastConfig's 1e-3); 5e-5 for optimizer_type='adamw'."
        },
    )
    weight_decay: float | None = field(
        default=None,
        metadata={
            "help": "Decoupled weight decay (Muon group for mugrokfast/muon). Default: the MuGrokfast preset's "
            "(0.1); 0.0 for optimizer_type='adamw'."
        },
    )
    optimizer_type: str = field(
        default="mugrokfast",
        metadata={
            "help": "'mugrokfast' (Grokfast + Muon + AdamW fallback + QK-clip), 'muon' (Muon + AdamW fallback, no "
            "Grokfast, no QK-clip) or 'adamw' (Trainer's own optimizer, chosen by `optim`)."
        },
    )
    mugrokfast_phase: int | None = field(
        default=None, metadata={"help": "Start from MuGrokfastConfig.for_phase(n) (SPEC presets: 1, 3, 5, 6, 7)."}
    )
    fallback_lr: float | None = field(
        default=None, metadata={"help": "AdamW fallback group's learning rate; default: the preset's, else lr."}
    )
    grokfast_alpha: float | None = field(default=None, metadata={"help": "Grokfast EMA decay; default 0.98."})
    grokfast_lambda: float | None = field(
        default=None, metadata={"help": "Grokfast amplification lambda; default: the preset's."}
    )
    qk_clip: bool = field(default=True, metadata={"help": "QK-clip on (mugrokfast only)."})
    qk_clip_tau: float | None = field(default=None, metadata={"help": "QK-clip threshold tau; default: the preset's."})
    ste_mode: bool | None = field(
        default=None, metadata={"help": "STE mode for quantized layers' shadow weights; default: the preset's."}
    )
    optim_metrics_interval: int | None = field(
        default=None, metadata={"help": "Steps between sampled optimizer health metrics; default 50."}
    )

    def __post_init__(self) -> None:
        if self.optimizer_type not in OPTIMIZER_TYPES:
            raise ValueError(f"optimizer_type={self.optimizer_type!r} is unknown. Fix: use one of {OPTIMIZER_TYPES}.")
        if self.optimizer_type == "adamw":
            self.learning_rate = TRAINER_DEFAULT_LR if self.learning_rate is None else self.learning_rate
            self.weight_decay = 0.0 if self.weight_decay is None else self.weight_decay
        else:
            try:
                config = self.mugrokfast_config()
            except (TypeError, ValueError) as error:  # name the argument the user set, not the optimizer's field
                message = str(error)
                for name, argument in OPTIMIZER_ARGUMENTS.items():
                    message = message.replace(f"MuGrokfastConfig.{name} ", f"{argument} (MuGrokfastConfig.{name}) ")
                if "preset for phase" in message:
                    message = f"mugrokfast_phase={self.mugrokfast_phase}: {message}"
                raise ValueError(message) from None
            self.learning_rate, self.weight_decay = config.lr, config.weight_decay
        super().__post_init__()

    def mugrokfast_config(self) -> MuGrokfastConfig:
        """The optimizer config: the phase preset (or the defaults), then every field set on these arguments."""
        overrides = {
            "lr": self.learning_rate,
            "weight_decay": self.weight_decay,
            "fallback_lr": self.fallback_lr,
            "grokfast_alpha": self.grokfast_alpha,
            "grokfast_lambda": self.grokfast_lambda,
            "qk_clip_tau": self.qk_clip_tau,
            "ste_mode": self.ste_mode,
            "metrics_interval": self.optim_metrics_interval,
        }
        overrides = {name: value for name, value in overrides.items() if value is not None}
        if self.mugrokfast_phase is not None:
            config = MuGrokfastConfig.for_phase(self.mugrokfast_phase, **overrides)
        else:
            config = MuGrokfastConfig(**overrides)
        if not self.qk_clip:
            config = replace(config, qk_clip_tau=None)
        return muon_only(config) if self.optimizer_type == "muon" else config


class ForgeTrainer(Trainer):
    """`Trainer` that records each forward's Forge diagnostics and logs their mean over the logging window."""

    def __init__(self, *args, **kwargs) -> None:
        self._optimizer_monitor: MuGrokfastCallback | None = None
        super().__init__(*args, **kwargs)
        self._metrics = {mode: defaultdict(list) for mode in ("train", "eval")}  # mode -> name -> values
        control = ControlCallback.from_env()  # pause-and-checkpoint when a controller (the dashboard) asks
        if control is not None:
            self.add_callback(control)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """MuGrokfast / Muon when `ForgeTrainingArguments.optimizer_type` asks for it, else Trainer's optimizer; a
        MuGrokfast optimizer (built here or passed in) gets its health monitor, logged through `_metrics`."""
        if self.optimizer is None and isinstance(self.args, ForgeTrainingArguments):
            if self.args.optimizer_type != "adamw":
                self.optimizer = create_mugrokfast(
                    self.model if model is None else model, self.args.mugrokfast_config()
                )
        optimizer = super().create_optimizer(model) if self.optimizer is None else self.optimizer
        if isinstance(unwrap_optimizer(optimizer), MuGrokfast) and self._optimizer_monitor is None:
            self._optimizer_monitor = MuGrokfastCallback(sink=self._metrics["train"])
            self.add_callback(self._optimizer_monitor)
        return optimizer

    def _qk_clip_optimizer(self, model) -> MuGrokfast | None:
        """The MuGrokfast optimizer when this training forward should report attention logits for QK-clip."""
        optimizer = unwrap_optimizer(self.optimizer)
        if not (model.training and isinstance(optimizer, MuGrokfast) and optimizer.qk_clip_enabled):
            return None
        return optimizer if self.state.global_step % optimizer.config.qk_clip_interval == 0 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        qk_optimizer = self._qk_clip_optimizer(model)
        if qk_optimizer is not None:
            inputs = {**inputs, "output_attention_logit_max": True}
        outputs = model(**inputs)
        if qk_optimizer is not None:
            if getattr(outputs, "attention_logit_max", None) is None:
                raise ValueError(
                    "QK-clip is on but the model returned no `attention_logit_max`. Fix: use a model whose forward "
                    "supports output_attention_logit_max=True, or turn QK-clip off (qk_clip=False)."
                )
            logit_max = outputs.attention_logit_max
            if self.accelerator.num_processes > 1:  # every rank clips by the same (global) maximum, so replicas agree
                logit_max = self.accelerator.gather(logit_max[None]).amax(0)
            qk_optimizer.record_attention_logit_max(logit_max)
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
        logs.update(averaged)  # in place: `evaluate()` returns this same dict
        self._metrics[mode].clear()
        super().log(logs, start_time)


__all__ = ["OPTIMIZER_TYPES", "ForgeTrainer", "ForgeTrainingArguments", "forge_metrics"]
