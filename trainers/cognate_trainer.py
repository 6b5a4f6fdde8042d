"""Phase 1 (Cognate): pretrain three specialised TRM x Titans-MAG models from one shared initialisation.

`CognateTrainer` is a `ForgeTrainer` that trains on a curriculum in order, evaluates at every stage boundary
(loss per TRM step and rolling perplexity on held-out text), and logs the specification's `act/ema_acc_stepN` and
`memory/*` metrics. `run_phase1` builds the tokenizer and the shared initialisation, trains the specialisations,
writes each as a Hub-ready folder, and checks that they diverged. `recipes/phase1.py` is its command line.
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from accelerate import PartialState
from torch.utils.data import SequentialSampler
from transformers import AutoTokenizer, TrainerCallback, set_seed
from transformers.utils import logging

from evaluation.corpus import corpus_texts
from evaluation.perplexity import perplexity
from hub_cards import line_plot
from modeling_forge import ForgeConfig, ForgeForCausalLM
from modeling_forge.tokenization import build_tokenizer

from .base import ForgeTrainer
from .checkpointing import finished_output, last_complete_checkpoint, remove_work_dir
from .cognate_config import CognateConfig
from .data import CurriculumData, build_curriculum
from .diversity import diversity_report, write_diversity_report
from .inputs import check_checkpoint_folder
from .monitors import ACTHaltingMonitor, GateSaturationMonitor, LossSpikeRollback, check_parameter_budget
from .phase_output import save_phase_output

logger = logging.get_logger(__name__)

ACC_EMA_DECAY = 0.98  # SPEC: EMA (0.98) of per-step accuracy, for monitoring


class CurriculumCallback(TrainerCallback):
    """Asks for an evaluation at the end of every curriculum stage."""

    def __init__(self, curriculum: CurriculumData, evaluate: bool = True) -> None:
        self.curriculum = curriculum
        self.evaluate = evaluate
        self.stage_ends = {entry["end_step"] for entry in curriculum.schedule}

    def on_step_end(self, args, state, control, **kwargs):
        if self.evaluate and state.global_step in self.stage_ends:
            control.should_evaluate = True
        return control


class CognateTrainer(ForgeTrainer):
    """ForgeTrainer for Phase 1: curriculum order, per-stage validation perplexity, ACT/memory monitoring."""

    def __init__(self, *args, curriculum: CurriculumData, eval_texts: list[str] | None = None, eval_tokens=20_000,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.curriculum = curriculum
        self.eval_texts = eval_texts or []
        self.eval_tokens = eval_tokens
        self.last_loss: float | None = None
        self._acc_ema: dict[int, float] = {}
        self._memory_rms: list[float] = []
        self.stage_evaluations: list[dict] = []
        for module in self.model.modules():  # memory/* metrics: RMS of each memory readout while training
            if type(module).__name__ in ("ForgeEMAMemory", "ForgeNeuralMemory"):
                module.register_forward_hook(self._record_memory)
        self.add_callback(CurriculumCallback(curriculum, evaluate=self.eval_dataset is not None))

    def _record_memory(self, module, inputs, output) -> None:
        if module.training:
            self._memory_rms.append(float(output.detach().pow(2).mean().sqrt()))

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.last_loss = float(loss.detach())
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and outputs.step_accuracies is not None:
            metrics = self._metrics["train"]
            for step, accuracy in enumerate(outputs.step_accuracies.tolist()):
                previous = self._acc_ema.get(step, accuracy)
                self._acc_ema[step] = ACC_EMA_DECAY * previous + (1 - ACC_EMA_DECAY) * accuracy
                metrics[f"act/ema_acc_step{step}"].append(self._acc_ema[step])
            if self._memory_rms:
                metrics["memory/readout_rms"].append(sum(self._memory_rms) / len(self._memory_rms))
                self._memory_rms.clear()
            memory_type = getattr(self.model.config, "memory_type", None)
            if memory_type == "ema":
                metrics["memory/decay"].append(self.model.config.memory_decay)
            elif memory_type == "neural":
                metrics["memory/forget_scale"].append(self.model.config.memory_forget_scale)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: say which stage produced it
            entry = self.curriculum.stage_at(max(self.state.global_step - 1, 0))
            logs.update({"curriculum/stage": entry["stage"], "curriculum/seq_len": entry["seq_len"]})
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.eval_texts and self.processing_class is not None:
            block = self.curriculum.schedule[-1]["seq_len"]
            result = perplexity(self.model, self.processing_class, self.eval_texts, max_length=2 * block,
                                stride=block, max_tokens=self.eval_tokens)  # fmt: skip
            metrics[f"{metric_key_prefix}_perplexity"] = result.perplexity
            entry = self.curriculum.stage_at(max(self.state.global_step - 1, 0))
            self.stage_evaluations.append({"step": self.state.global_step, "stage": entry["name"], **metrics})
            self.log({f"{metric_key_prefix}_perplexity": result.perplexity, "curriculum/stage": entry["stage"]})
        return metrics


def _specialised_overrides(base: ForgeConfig, spec: dict) -> dict:
    """ForgeConfig overrides of one specialisation; `memory_decay_scale` scales the memory's forgetting rate (the
    EMA's `1 - memory_decay`, the neural memory's `memory_forget_scale`)."""
    overrides = dict(spec.get("model", {}))
    scale = overrides.pop("memory_decay_scale", None)
    if scale is not None and base.memory_type == "neural":
        overrides["memory_forget_scale"] = base.memory_forget_scale * float(scale)
    elif scale is not None:
        overrides["memory_decay"] = 1.0 - (1.0 - base.memory_decay) * float(scale)
    if "trm_max_steps" in overrides and "trm_step_weights" not in overrides:
        overrides["trm_step_weights"] = None  # re-derive the weights for the new depth
    return overrides


def _load_or_build_tokenizer(config: CognateConfig, init_dir: Path):
    if (init_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(init_dir)
    if config.tokenizer_name_or_path:
        return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    from evaluation.tasks import get_task_family

    texts = corpus_texts("train", max_chars=config.tokenizer_chars)
    for name in ("arithmetic", "code", "kv_recall"):  # so digits, code and keys get merges too
        family = get_task_family(name)
        texts += [family.training_text(e) for e in family.generate("train", 300, seed=0, difficulty=5)]
    return build_tokenizer(texts, config.tokenizer_vocab_size)


def _training_args(config: CognateConfig, name: str, seed: int, work_dir: Path) -> CognateConfig:
    """The per-specialisation Trainer arguments: own folder and seed, Trainer never pushes (phase outputs do)."""
    return dataclasses.replace(
        config, output_dir=str(work_dir / name), seed=seed, data_seed=seed, push_to_hub=False, hub_model_id=None,
        run_name=f"{Path(config.output_dir).name}-phase1-{name}",
    )  # fmt: skip


def _validation_blocks(tokenizer, seq_len: int, n_blocks: int = 8) -> torch.Tensor:
    from .data import source_blocks

    blocks = source_blocks("corpus", tokenizer, block_size=seq_len, n_blocks=n_blocks, split="validation",
                           seed=0, difficulty=(1, 1))  # fmt: skip
    return torch.tensor([ids for ids, _ in blocks])


def run_phase1(config: CognateConfig) -> dict:
    """Run Phase 1 end to end (resumable) and return a summary; see the module docstring."""
    state = PartialState(cpu=config.use_cpu)  # as the Trainer below will (gloo on CPU)
    started = time.time()
    phase_dir = Path(config.output_dir) / "phase1"
    work_dir = phase_dir / ".work"
    init_dir = phase_dir / "init"
    names = list(config.specializations)
    finished = [name for name in names if finished_output(phase_dir / name)]
    if finished and not config.resume:
        raise FileExistsError(
            f"{phase_dir} already holds finished specialisations {finished}. Fix: pass --resume to continue this "
            "run, or choose another output_dir."
        )
    if "wandb" in (config.report_to or []):
        os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user chose a mode

    # 1. Tokenizer and the one shared initialisation (main process writes, everyone reads).
    if state.is_main_process and not finished_output(init_dir):
        tokenizer = _load_or_build_tokenizer(config, init_dir)
        vocab = config.model_vocab_size or -(-len(tokenizer) // 64) * 64
        model_config = ForgeConfig.from_preset(
            config.model_preset, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config.model_overrides,
        )  # fmt: skip
        torch.manual_seed(config.init_seed)
        init_model = ForgeForCausalLM(model_config)
        n_params = check_parameter_budget(init_model, config.param_budget)
        save_phase_output(
            init_dir, model=init_model, tokenizer=tokenizer, phase=1, phase_name="cognate-init",
            config={"model": model_config.to_diff_dict(), "init_seed": config.init_seed}, seed=config.init_seed,
            metrics={"parameters": n_params}, wall_time_s=0.0, model_name="forge-phase1-init",
            card_sections={"summary": "The shared random initialisation all Phase 1 specialisations start from "
                                      "(their common base for Phase 2's task-vector merges)."},
        )  # fmt: skip
    state.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    check_checkpoint_folder(init_dir, tokenizer=tokenizer)  # a resumed run's init must be intact
    init_model = ForgeForCausalLM.from_pretrained(init_dir)
    check_parameter_budget(init_model, config.param_budget)
    eval_texts = corpus_texts("validation")

    summary = {"output_dir": str(phase_dir), "specializations": {}}
    for name in names:
        final_dir = phase_dir / name
        if finished_output(final_dir):
            logger.info("Phase 1 %s already finished at %s; skipping it.", name, final_dir)
            summary["specializations"][name] = json.loads((final_dir / "metrics.json").read_text())["metrics"]
            continue
        spec = config.specializations[name]
        seed = int(spec.get("seed", 0))
        set_seed(seed)
        overrides = _specialised_overrides(init_model.config, spec)
        model = ForgeForCausalLM.from_pretrained(init_dir, **overrides)
        args = _training_args(config, name, seed, work_dir)
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * state.num_processes
        train = build_curriculum(config.stages, tokenizer, max_steps=config.max_steps, global_batch_size=global_batch,
                                 seed=seed, mixture_scale=spec.get("mixture_scale"))  # fmt: skip
        last = config.stages[-1]
        evaluation = build_curriculum([dataclasses.replace(last, end=1.0)], tokenizer, max_steps=2,
                                      global_batch_size=8, seed=0, split="validation")  # fmt: skip
        trainer = CognateTrainer(
            model=model, args=args, train_dataset=train.dataset, eval_dataset=evaluation.dataset,
            processing_class=tokenizer, curriculum=train, eval_texts=eval_texts, eval_tokens=config.eval_tokens,
        )  # fmt: skip
        monitors = [
            ACTHaltingMonitor(model.config.trm_max_steps, sink=trainer._metrics["train"]),
            GateSaturationMonitor(sink=trainer._metrics["train"]),
            LossSpikeRollback(
                lambda t=trainer: t.last_loss,
                spike_factor=config.loss_spike_factor,
                lr_factor=config.rollback_lr_factor,
                snapshot_interval=config.snapshot_interval,
                sink=trainer._metrics["train"],
            ),  # fmt: skip
        ]
        for monitor in monitors:
            trainer.add_callback(monitor)
        # The newest checkpoint Trainer wrote to the end (one cut by a kill is removed, not resumed from).
        checkpoint = last_complete_checkpoint(args.output_dir) if config.resume else None
        spec_started = time.time()
        trainer.train(resume_from_checkpoint=checkpoint)
        final_eval = trainer.evaluate()
        if state.is_main_process:
            metrics, eval_results = _phase1_metrics(trainer, final_eval, model.config)
            events = [event for monitor in monitors for event in monitor.events]
            _save_specialisation(final_dir, trainer, tokenizer, config, name, spec, overrides, init_dir, metrics,
                                 eval_results, events, time.time() - spec_started)  # fmt: skip
            summary["specializations"][name] = metrics
            remove_work_dir(args.output_dir)  # its checkpoints are superseded by the finished folder
        state.wait_for_everyone()

    if state.is_main_process:
        models = {name: ForgeForCausalLM.from_pretrained(phase_dir / name).eval() for name in names}
        report = diversity_report(
            models, init_model, tokenizer, text_blocks=_validation_blocks(tokenizer, config.stages[-1].seq_len),
            task_examples=_diversity_tasks(config, init_model.config),
        )  # fmt: skip
        write_diversity_report(report, phase_dir)
        summary["diversity"] = {"diverged": report["diverged"], "pairs": report["pairs"]}
        remove_work_dir(work_dir)
    summary["wall_time_s"] = time.time() - started
    return summary


def _diversity_tasks(config: CognateConfig, model_config: ForgeConfig) -> dict[str, list]:
    from evaluation.tasks import get_task_family

    n = config.eval_task_examples
    # Key-value recall whose queried pair lies further back than the attention window reaches (the memory's job).
    far = max(60, model_config.sliding_window)  # in words; each word is >= 1 token
    return {
        "arithmetic": get_task_family("arithmetic").generate("validation", n, seed=0, difficulty=1),
        "kv_recall": get_task_family("kv_recall", distance_words=far, num_pairs=2).generate(
            "validation", n, seed=0, difficulty=1
        ),
    }


def _phase1_metrics(trainer: CognateTrainer, final_eval: dict, model_config: ForgeConfig) -> tuple[dict, list]:
    steps = model_config.trm_max_steps + 1
    metrics = {
        "eval/perplexity": final_eval["eval_perplexity"],
        **{f"eval/loss_step_{t}": final_eval[f"eval_loss/step_{t}"] for t in range(steps)},
        "eval/act_avg_steps": final_eval["eval_act/avg_steps"],
        "eval/gate_m_usage": final_eval.get("eval_gate/m_usage", float("nan")),
        "eval/gate_entropy": final_eval.get("eval_gate/entropy", float("nan")),
    }
    last_stage = trainer.curriculum.schedule[-1]["name"]
    for entry in trainer.stage_evaluations:
        if entry["stage"] != last_stage:  # the last stage's end is the final evaluation above
            metrics[f"eval/perplexity_after_{entry['stage']}"] = entry["eval_perplexity"]
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry and "loss/lm" in entry]
    if train_logs:
        metrics["train/loss_last_window"] = train_logs[-1]["loss"]
        metrics["train/loss_first_window"] = train_logs[0]["loss"]
    eval_results = [{"dataset": "agent-forge/shakespeare", "split": "validation", "metric": "perplexity",
                     "value": metrics["eval/perplexity"]}]  # fmt: skip
    return metrics, eval_results


def _save_specialisation(final_dir, trainer, tokenizer, config, name, spec, overrides, init_dir, metrics,
                         eval_results, events, wall_time) -> None:  # fmt: skip
    logs = trainer.state.log_history

    def write_extras(folder: Path) -> None:
        train = [e for e in logs if "loss/lm" in e and "loss" in e]
        steps = trainer.model.config.trm_max_steps + 1
        xs = [e["step"] for e in train]
        line_plot(folder / "plots" / "loss_per_trm_step.png",
                  {f"y{t}": (xs, [e[f"loss/step_{t}"] for e in train]) for t in range(steps)},
                  title=f"Phase 1 {name}: training loss per TRM step", xlabel="step", ylabel="nats")  # fmt: skip
        evals = [e for e in logs if "eval_perplexity" in e]
        if evals:
            line_plot(folder / "plots" / "validation_perplexity.png",
                      {"validation": ([e["step"] for e in evals], [e["eval_perplexity"] for e in evals])},
                      title=f"Phase 1 {name}: validation perplexity", xlabel="step", ylabel="perplexity")  # fmt: skip
        (folder / "training_log.json").write_text(json.dumps(logs, indent=2))
        (folder / "health_events.json").write_text(json.dumps(events, indent=2))
        (folder / "curriculum.json").write_text(json.dumps(trainer.curriculum.schedule, indent=2))

    event_text = (
        "\n".join(f"- step {e['step']}: {e.get('message') or e.get('reason')}" for e in events)
        or "No monitor fired during training."
    )
    save_phase_output(
        final_dir, model=trainer.model, tokenizer=tokenizer, phase=1, phase_name="cognate",
        config={"specialization": name, "spec": spec, "model_overrides": overrides,
                "training": {k: v for k, v in config.to_dict().items() if not k.startswith("_")}},
        inputs=[init_dir], metrics=metrics, eval_results=eval_results, seed=int(spec.get("seed", 0)),
        wall_time_s=wall_time, datasets=sorted({s for stage in config.stages for s in stage.mixture}),
        tags=[f"cognate-{name}"], card_template="phase1_cognate", model_name=f"forge-phase1-{name}",
        card_sections={"specialization": name, "spec": json.dumps(spec), "events": event_text,
                       "curriculum": trainer.curriculum.schedule},
        write_extras=write_extras, overwrite=config.resume,
        push_to_hub=_hub_repo(config, name), hub_token=config.hub_token, hub_private=config.hub_private_repo,
    )  # fmt: skip


def _hub_repo(config: CognateConfig, name: str) -> str | None:
    """`<hub_model_id or run name>-phase1-<name>` when `--push_to_hub` is set."""
    return f"{config.hub_model_id or Path(config.output_dir).name}-phase1-{name}" if config.push_to_hub else None


__all__ = ["CognateTrainer", "CurriculumCallback", "run_phase1"]
