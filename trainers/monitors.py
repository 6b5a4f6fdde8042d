"""Training health monitors, one `TrainerCallback` per failure the Phase 1 premortem names.

Each logs (into the trainer's metrics and `events`), warns (once per excursion), and acts where the specification
says so: a loss spike or NaN restores the last good state and lowers the learning rate. ACT and gate pathologies are
reported, not corrected: the specification asks for no automatic action there. Optimizer health (Grokfast
amplification, Newton-Schulz orthogonality, QK-clip rate) is `MuGrokfastCallback`'s, attached by `ForgeTrainer`.
"""

import copy
import math
from collections.abc import Callable

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .tracking import send_alert

logger = logging.get_logger(__name__)


class _Monitor(TrainerCallback):
    """Shared bookkeeping: events for reports, a metrics sink, and warn-once-per-excursion."""

    def __init__(self, sink: dict[str, list[float]] | None = None) -> None:
        self.sink = sink
        self.events: list[dict] = []
        self._alarmed: set[str] = set()

    def _raise_alarm(self, name: str, step: int, message: str, **details) -> None:
        if name in self._alarmed:
            return
        self._alarmed.add(name)
        self.events.append({"event": name, "step": step, "message": message, **details})
        logger.warning("step %d: %s", step, message)
        send_alert(name, message, step)

    def _clear_alarm(self, name: str) -> None:
        self._alarmed.discard(name)


class ACTHaltingMonitor(_Monitor):
    """ACT halting pathologies after a warm-up: always halting at step 0, or never halting before T_max."""

    def __init__(self, max_steps: int, warmup_fraction: float = 0.3, sink=None) -> None:
        super().__init__(sink)
        self.trm_max_steps = max_steps
        self.warmup_fraction = warmup_fraction

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "act/avg_steps" not in logs or state.global_step < self.warmup_fraction * max(state.max_steps, 1):
            return
        avg_steps, halt0 = logs["act/avg_steps"], logs.get("act/halt_prob_step0", 0.0)
        if avg_steps < 0.5 or halt0 > 0.9:
            self._raise_alarm(
                "act_always_halts", state.global_step,
                f"ACT always halts at step 0 (act/avg_steps={avg_steps:.2f}, act/halt_prob_step0={halt0:.2f}): the "
                "recursion is unused. Premortem C1: lower act_threshold (e.g. 0.3) or use harder data.",
                avg_steps=avg_steps, halt_prob_step0=halt0,
            )  # fmt: skip
        else:
            self._clear_alarm("act_always_halts")
        if self.trm_max_steps > 0 and avg_steps >= self.trm_max_steps - 0.05:
            self._raise_alarm(
                "act_never_halts", state.global_step,
                f"ACT never halts before T_max={self.trm_max_steps} (act/avg_steps={avg_steps:.2f}): inference "
                "always pays every step. Premortem C1: raise act_threshold (e.g. 0.7), check act/ema_acc_stepN.",
                avg_steps=avg_steps,
            )  # fmt: skip
        else:
            self._clear_alarm("act_never_halts")


class GateSaturationMonitor(_Monitor):
    """MAG gate saturation: memory unused (`gate/m_usage` < 0.2) or gates pinned (`gate/entropy` < 0.5)."""

    def __init__(self, min_m_usage: float = 0.2, min_entropy: float = 0.5, warmup_fraction: float = 0.1, sink=None):
        super().__init__(sink)
        self.min_m_usage = min_m_usage
        self.min_entropy = min_entropy
        self.warmup_fraction = warmup_fraction

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "gate/m_usage" not in logs or state.global_step < self.warmup_fraction * max(state.max_steps, 1):
            return
        usage, entropy = logs["gate/m_usage"], logs.get("gate/entropy", math.log(2))
        if usage < self.min_m_usage:
            self._raise_alarm(
                "gate_memory_unused", state.global_step,
                f"The MAG gate ignores the memory (gate/m_usage={usage:.3f} < {self.min_m_usage}). Premortem: check "
                "gate/entropy, raise gate_entropy_weight (e.g. 0.01), check the memory decay.", m_usage=usage,
            )  # fmt: skip
        else:
            self._clear_alarm("gate_memory_unused")
        if entropy < self.min_entropy:
            self._raise_alarm(
                "gate_saturated", state.global_step,
                f"MAG gates are saturated (gate/entropy={entropy:.3f} < {self.min_entropy}). Premortem: raise "
                "gate_entropy_weight, lower the gate learning rate.", entropy=entropy,
            )  # fmt: skip
        else:
            self._clear_alarm("gate_saturated")


class LossSpikeRollback(_Monitor):
    """On a NaN/inf loss, non-finite weights, or a loss above `spike_factor` x its running mean: restore the last
    good model and optimizer state (an in-memory snapshot taken every `snapshot_interval` healthy steps) and
    multiply the learning rate by `lr_factor`. Training then continues from the restored state."""

    def __init__(
        self,
        loss_source: Callable[[], float | None],
        spike_factor: float = 3.0,
        lr_factor: float = 0.5,
        snapshot_interval: int = 20,
        warmup_steps: int = 10,
        sink=None,
    ) -> None:
        super().__init__(sink)
        self.loss_source = loss_source
        self.spike_factor = spike_factor
        self.lr_factor = lr_factor
        self.snapshot_interval = snapshot_interval
        self.warmup_steps = warmup_steps
        self.running_loss: float | None = None
        self.rollbacks = 0
        self._snapshot: dict | None = None

    def _take_snapshot(self, step: int, model, optimizer) -> None:
        self._snapshot = {
            "step": step,
            "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
        }

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._take_snapshot(state.global_step, model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        loss = self.loss_source()
        if loss is None:
            return
        reason = None
        if not math.isfinite(loss):
            reason = f"non-finite loss ({loss})"
        elif (
            self.running_loss is not None
            and state.global_step > self.warmup_steps
            and loss > self.spike_factor * self.running_loss
        ):
            reason = f"loss spike ({loss:.3f} > {self.spike_factor} x running mean {self.running_loss:.3f})"
        elif state.global_step % self.snapshot_interval == 0 and not all(
            torch.isfinite(p).all() for p in model.parameters()
        ):
            reason = "non-finite weights"
        if reason is None:
            self.running_loss = loss if self.running_loss is None else 0.9 * self.running_loss + 0.1 * loss
            if state.global_step % self.snapshot_interval == 0:
                self._take_snapshot(state.global_step, model, optimizer)
            return
        self._rollback(state.global_step, reason, model, optimizer, lr_scheduler)

    def _rollback(self, step: int, reason: str, model, optimizer, lr_scheduler) -> None:
        model.load_state_dict(self._snapshot["model"])
        if optimizer is not None and self._snapshot["optimizer"] is not None:
            optimizer.load_state_dict(copy.deepcopy(self._snapshot["optimizer"]))
        if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = [lr * self.lr_factor for lr in lr_scheduler.base_lrs]
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_factor
        self.rollbacks += 1
        event = {
            "event": "rollback",
            "step": step,
            "reason": reason,
            "restored_step": self._snapshot["step"],
            "lr_factor": self.lr_factor,
        }
        self.events.append(event)
        send_alert("rollback", f"{reason}; restored step {self._snapshot['step']}, lr x {self.lr_factor}", step)
        if self.sink is not None:
            self.sink["health/rollbacks"].append(float(self.rollbacks))
        logger.warning(
            "step %d: %s; restored the state of step %d and multiplied the learning rate by %s",
            step, reason, self._snapshot["step"], self.lr_factor,
        )  # fmt: skip


def check_parameter_budget(model: torch.nn.Module, budget: list | tuple | None) -> int:
    """Count parameters (tied ones once) and raise a ValueError if outside `budget = [min, max]`."""
    count = sum(p.numel() for p in model.parameters())
    if budget is not None and not budget[0] <= count <= budget[1]:
        raise ValueError(
            f"The model has {count:,} parameters, outside the budget [{budget[0]:,}, {budget[1]:,}]. Fix: adjust "
            "the preset (hidden_size, intermediate_size, layers, vocabulary) or the budget."
        )
    return count


__all__ = ["ACTHaltingMonitor", "GateSaturationMonitor", "LossSpikeRollback", "check_parameter_budget"]
