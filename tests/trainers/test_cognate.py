"""Phase 1 (Cognate): curriculum, trainer metrics, health monitors, reproducibility, the three outputs, DDP."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from evaluation.perplexity import perplexity
from modeling_forge import ForgeConfig, ForgeForCausalLM
from trainers.cognate_config import CognateConfig
from trainers.cognate_trainer import CognateTrainer, run_phase1
from trainers.data import CurriculumStage, build_curriculum
from trainers.monitors import ACTHaltingMonitor, GateSaturationMonitor, LossSpikeRollback, check_parameter_budget

STAGES = [
    CurriculumStage("short", 0.4, 136, {"corpus": 0.5, "arithmetic": 0.5}, (1, 1)),
    CurriculumStage("long", 1.0, 240, {"corpus": 0.25, "kv_recall": 0.75}, (1, 1)),
]


def _args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 10,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "logging_steps": 2,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "prediction_loss_only": True,
        "optimizer_type": "mugrokfast",
        "mugrokfast_phase": 1,
        "seed": 0,
        "curriculum": [
            {
                "name": s.name,
                "end": s.end,
                "seq_len": s.seq_len,
                "mixture": s.mixture,
                "difficulty": list(s.difficulty),
            }
            for s in STAGES
        ],
    }
    values.update(overrides)
    return CognateConfig(**values)


def _trainer(tiny_tokenizer, tmp_path, model=None, **overrides):
    args = _args(tmp_path, **overrides)
    if model is None:
        torch.manual_seed(0)
        model = ForgeForCausalLM(ForgeConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer)))
    curriculum = build_curriculum(args.stages, tiny_tokenizer, max_steps=args.max_steps, global_batch_size=4, seed=0)
    return CognateTrainer(
        model=model,
        args=args,
        train_dataset=curriculum.dataset,
        eval_dataset=curriculum.dataset.select(range(4)),
        processing_class=tiny_tokenizer,
        curriculum=curriculum,
        eval_texts=["O Romeo, Romeo, wherefore art thou Romeo? " * 20],
        eval_tokens=400,
    )


def test_curriculum_blocks_switch_at_the_configured_steps(tiny_tokenizer):
    data = build_curriculum(STAGES, tiny_tokenizer, max_steps=10, global_batch_size=4, seed=0)
    assert [(e["start_step"], e["end_step"], e["seq_len"]) for e in data.schedule] == [(0, 4, 136), (4, 10, 240)]
    stages = data.dataset["stage"]
    assert stages == [0] * 16 + [1] * 24  # steps x global batch blocks per stage, in training order
    lengths = [len(ids) for ids in data.dataset["input_ids"]]
    assert set(lengths[:16]) == {136} and set(lengths[16:]) == {240}
    sources = data.dataset["source"]
    assert sorted(sources[:16]).count("arithmetic") == 8 and sources[16:].count("kv_recall") == 18
    assert data.stage_at(3)["name"] == "short" and data.stage_at(4)["name"] == "long"
    for ids, labels in zip(data.dataset["input_ids"], data.dataset["labels"], strict=True):  # task blocks are padded
        assert all(label in (token, -100) for token, label in zip(ids, labels, strict=True))


def test_curriculum_validation_names_the_problem(tiny_tokenizer):
    bad = [CurriculumStage("a", 0.5, 64, {"corpus": 1.0}), CurriculumStage("b", 0.9, 64, {"corpus": 1.0})]
    with pytest.raises(ValueError, match="last stage must end at 1.0"):
        build_curriculum(bad, tiny_tokenizer, max_steps=4, global_batch_size=2)
    with pytest.raises(ValueError, match="unknown source 'wiki'"):
        build_curriculum([CurriculumStage("a", 1.0, 64, {"wiki": 1.0})], tiny_tokenizer, max_steps=4,
                         global_batch_size=2)  # fmt: skip
    with pytest.raises(ValueError, match="longer than 16 tokens.*raise the stage's seq_len"):
        build_curriculum([CurriculumStage("a", 1.0, 16, {"arithmetic": 1.0})], tiny_tokenizer, max_steps=2,
                         global_batch_size=2)  # fmt: skip


def test_a_task_level_smaller_than_the_request_gives_what_it_has_instead_of_nothing(tiny_tokenizer):
    """Difficulty-1 arithmetic has ~333 validation problems: asking for 800 blocks reuses them (it raised before)."""
    from trainers.data import source_blocks

    blocks = source_blocks("arithmetic", tiny_tokenizer, block_size=128, n_blocks=800, split="validation", seed=0,
                           difficulty=(1, 1))  # fmt: skip
    assert len(blocks) == 800
    distinct = {tuple(ids) for ids, _ in blocks}
    assert 50 <= len(distinct) < 800  # the level's problems, packed, then repeated
    small = source_blocks("arithmetic", tiny_tokenizer, block_size=128, n_blocks=20, split="validation", seed=0,
                          difficulty=(1, 1))  # fmt: skip
    assert len({tuple(ids) for ids, _ in small}) == 20  # a request the level can meet is not cut down


def test_cognate_trainer_follows_the_curriculum_and_logs_every_metric(tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_tokenizer, tmp_path)
    untrained = perplexity(trainer.model, tiny_tokenizer, trainer.eval_texts, max_length=480, stride=240,
                           max_tokens=trainer.eval_tokens).perplexity  # fmt: skip
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        if model.training:
            seen.append(inputs["input_ids"].shape[1])
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    assert seen == [136] * 4 + [240] * 6  # the stage (and its sequence length) switches at step 4
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    expected = {"loss/lm", "loss/act", "gate/entropy", "gate/m_usage", "act/avg_steps", "act/halt_prob_step0",
                "memory/readout_rms", "memory/forget_scale", "curriculum/stage", "curriculum/seq_len"}  # fmt: skip
    expected |= {f"loss/step_{t}" for t in range(4)} | {f"act/ema_acc_step{t}" for t in range(4)}
    assert expected <= set(train_logs[-1]), expected - set(train_logs[-1])
    assert [e["curriculum/seq_len"] for e in train_logs] == [136, 136, 240, 240, 240]
    assert any(key.startswith("optim/") for e in train_logs for key in e)  # MuGrokfast health metrics
    stage_evals = [e for e in trainer.state.log_history if "eval_perplexity" in e]
    assert [e["step"] for e in stage_evals] == [4, 10]  # validation perplexity at every stage end
    # Each stage-end perplexity is measured on the same text as the untrained model's; 10 steps lower it a little at
    # every stage end (measured 521 -> 509 -> 497), so each must be at least 1% below the one before.
    assert untrained > 0.9 * len(tiny_tokenizer)  # about uniform before training
    ppl = [untrained] + [e["eval_perplexity"] for e in stage_evals]
    assert all(later < 0.99 * earlier for earlier, later in zip(ppl[:-1], ppl[1:], strict=True)), ppl


def test_same_seed_gives_an_identical_loss_trace(tiny_tokenizer, tmp_path):
    traces = []
    for run in range(2):
        trainer = _trainer(tiny_tokenizer, tmp_path / str(run), max_steps=20, logging_steps=1)
        trainer.train()
        traces.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(traces[0]) == 20 and traces[0] == traces[1]


def test_act_monitor_fires_on_a_model_forced_to_always_halt(tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_tokenizer, tmp_path)
    with torch.no_grad():
        trainer.model.model.recursion.act_head.bias.fill_(12.0)  # q_0 ~ 1: halts at step 0 everywhere
    monitor = ACTHaltingMonitor(max_steps=3, warmup_fraction=0.0)
    trainer.add_callback(monitor)
    trainer.train()
    assert [e["event"] for e in monitor.events][:1] == ["act_always_halts"]


@pytest.mark.parametrize("halts", [False, True])
def test_act_never_halts_monitor_fires_only_on_a_model_that_never_halts(tiny_tokenizer, tmp_path, halts):
    trainer = _trainer(tiny_tokenizer, tmp_path)
    head = trainer.model.model.recursion.act_head
    with torch.no_grad():
        if halts:  # q_t spread around 0.5: some positions halt at each step, none of the pathologies
            head.weight.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(0))
            head.bias.zero_()
            # and kept there: ten steps of an untrained model are right nowhere, so the ACT loss would teach the head
            # to stop halting (the correct response, but not the case under test)
            trainer.model.config.act_loss_weight = 0.0
        else:  # q_t ~ 0 everywhere: every real token runs all trm_max_steps
            head.weight.zero_()
            head.bias.fill_(-12.0)
    monitor = ACTHaltingMonitor(max_steps=3, warmup_fraction=0.0)
    trainer.add_callback(monitor)
    trainer.train()
    logged = [e["act/avg_steps"] for e in trainer.state.log_history if "act/avg_steps" in e]
    if halts:
        assert monitor.events == [] and all(0.5 < steps < 2.9 for steps in logged), logged
    else:
        assert [e["event"] for e in monitor.events] == ["act_never_halts"] and min(logged) > 2.95, logged


def test_act_metrics_count_real_tokens_only():
    """Padded positions (which halt wherever the head puts them) must not move the halting statistics."""
    from types import SimpleNamespace

    from trainers.base import forge_metrics, real_token_mask

    halt_steps = torch.tensor([[3, 3, 0, 0], [3, 3, 3, 3]])
    probs = torch.zeros(2, 4, 4)
    probs[0, 2:, 0] = 1.0  # the padded positions "halt" at step 0
    outputs = SimpleNamespace(halt_steps=halt_steps, halting_probs=probs)
    mask = real_token_mask({"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])})
    real = forge_metrics(outputs, mask)
    assert real["act/avg_steps"] == 3.0 and real["act/halt_prob_step0"] == 0.0 and real["act/halt_share_step3"] == 1.0
    assert forge_metrics(outputs)["act/avg_steps"] == 2.25  # what counting padding reported
    labels_only = real_token_mask({"labels": torch.tensor([[5, 6, -100, -100], [1, 2, 3, 4]])})
    assert torch.equal(labels_only, mask.bool())


def test_gate_monitor_fires_when_the_memory_is_ignored(tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_tokenizer, tmp_path)
    with torch.no_grad():
        for layer in trainer.model.model.layers:
            layer.gate.fc2.bias.fill_(15.0)  # g ~ 1: attention only, memory unused, saturated
    monitor = GateSaturationMonitor(warmup_fraction=0.0)
    trainer.add_callback(monitor)
    trainer.train()
    assert {e["event"] for e in monitor.events} == {"gate_memory_unused", "gate_saturated"}


def test_monitors_stay_silent_on_a_healthy_run(tiny_tokenizer, tmp_path):
    """The other direction of the checks above: a balanced gate and finite, smooth losses raise no event."""
    trainer = _trainer(tiny_tokenizer, tmp_path)
    with torch.no_grad():
        for layer in trainer.model.model.layers:
            layer.gate.fc2.weight.zero_()
            layer.gate.fc2.bias.zero_()  # g = 0.5 at the start: memory used, gate far from saturation
    gate = GateSaturationMonitor(warmup_fraction=0.0)
    rollback = LossSpikeRollback(lambda: trainer.last_loss, snapshot_interval=2)
    trainer.add_callback(gate)
    trainer.add_callback(rollback)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "gate/m_usage" in e]
    assert logs and all(e["gate/m_usage"] > 0.2 for e in logs)  # what the monitor read was healthy
    assert gate.events == [] and rollback.events == []


def test_nan_loss_rolls_back_lowers_the_lr_and_training_continues(tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_tokenizer, tmp_path, max_steps=12)
    monitor = LossSpikeRollback(lambda: trainer.last_loss, snapshot_interval=2, sink=trainer._metrics["train"])
    trainer.add_callback(monitor)
    original = trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        result = original(model, inputs, *args, **kwargs)
        if model.training and trainer.state.global_step == 6:  # the 7th step's loss is NaN
            loss = result[0] if isinstance(result, tuple) else result
            loss = loss * float("nan")
            return (loss, result[1]) if isinstance(result, tuple) else loss
        return result

    trainer.compute_loss = poisoned
    lrs = []

    class LrSpy(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            lrs.append(optimizer.param_groups[0]["lr"])

    trainer.add_callback(LrSpy())
    trainer.train()
    assert [(e["event"], e["step"], e["restored_step"]) for e in monitor.events] == [("rollback", 7, 6)]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the NaN step was undone
    assert trainer.state.global_step == 12 and math.isfinite(trainer.last_loss)  # and training went on
    assert lrs[7] < lrs[5] * 0.6  # the learning rate was halved (on top of the schedule's own decay)
    assert any("health/rollbacks" in e for e in trainer.state.log_history)


def test_parameter_budget_check():
    with torch.device("meta"):
        model = ForgeForCausalLM(ForgeConfig.from_preset("cognate-25m"))
    assert check_parameter_budget(model, [24_000_000, 26_000_000]) == 25_595_857
    with pytest.raises(ValueError, match="outside the budget"):
        check_parameter_budget(model, [1_000, 2_000])


def test_config_rejects_shape_changes_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="change parameter shapes"):
        _args(tmp_path, specializations={"wide": {"model": {"hidden_size": 128}}})
    with pytest.raises(ValueError, match="unknown keys"):
        _args(tmp_path, specializations={"x": {"lr": 1.0}})
    with pytest.raises(ValueError, match="param_budget"):
        _args(tmp_path, param_budget=[10, 1])


@pytest.mark.slow
def test_phase1_writes_three_loadable_specialisations_from_one_init(corpus_ready, tmp_path):
    config = _args(
        tmp_path,
        max_steps=12,
        tokenizer_vocab_size=512,
        tokenizer_chars=200_000,
        eval_tokens=1000,
        eval_task_examples=4,
        logging_steps=4,
    )
    summary = run_phase1(config)
    phase_dir = tmp_path / "run" / "phase1"
    init = json.loads((phase_dir / "init" / "forge_lineage.json").read_text())
    init_params = dict(ForgeForCausalLM.from_pretrained(phase_dir / "init").named_parameters())
    for name in ("reasoning", "memory", "speed"):
        folder = phase_dir / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        lineage = json.loads((folder / "forge_lineage.json").read_text())
        assert (
            lineage["parents"][0]["phase_name"] == "cognate-init"
            and lineage["parents"][0]["created"] == init["created"]
        )
        assert lineage["inputs"][0]["sha256"] is not None
        assert (folder / "README.md").exists() and (folder / "plots" / "loss_per_trm_step.png").exists()
        # Trained from the shared init: every parameter moved (a skipped or partial training would leave some).
        unchanged = [n for n, p in model.named_parameters() if torch.equal(p, init_params[n])]
        assert unchanged == [], (name, unchanged)
    reasoning, speed = (ForgeForCausalLM.from_pretrained(phase_dir / n).config for n in ("reasoning", "speed"))
    assert (reasoning.trm_max_steps, reasoning.act_threshold) == (4, 0.9)
    assert (speed.trm_max_steps, speed.act_threshold) == (2, 0.3)
    report = json.loads((phase_dir / "diversity_report.json").read_text())
    assert set(report["models"]) == {"reasoning", "memory", "speed"} and len(report["pairs"]) == 3
    assert summary["diversity"]["diverged"] == report["diverged"]
    assert not (phase_dir / ".work").exists()  # the Trainer checkpoints went with success
    with pytest.raises(FileExistsError, match="--resume"):
        run_phase1(config)
    # --resume with everything finished: nothing is retrained, the summary is read back
    resumed = run_phase1(_args(tmp_path, max_steps=12, resume=True, eval_task_examples=4, eval_tokens=1000))
    assert resumed["specializations"]["memory"] == summary["specializations"]["memory"]


@pytest.mark.slow
def test_cpu_ddp_keeps_replicas_identical(corpus_ready, tmp_path):
    """Two real processes (torchrun, gloo): after a few steps every rank holds the same parameters."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(worker), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    digests = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert digests[0]["world_size"] == 2 and digests[1]["world_size"] == 2
    assert digests[0]["params"] == digests[1]["params"]
    assert digests[0]["steps"] == 4 and digests[0]["changed"]


def test_wandb_tracking_runs_offline_with_the_spec_metric_names(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = _trainer(tiny_tokenizer, tmp_path, max_steps=4, report_to="wandb")
    trainer.train()
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, list(tmp_path.iterdir())
    names = (b"act/avg_steps", b"gate/m_usage", b"loss/step_0", b"curriculum/stage")
    # wandb's service process writes the history file asynchronously; on a loaded machine `finish()` has returned
    # while the file still held only its header once, so wait (bounded) for the writer rather than for a timer.
    deadline = time.monotonic() + 60
    while True:
        history = b"".join(path.read_bytes() for path in runs[0].glob("run-*.wandb"))
        if all(name in history for name in names) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name in names:
        assert name in history, (name, len(history))


def _perturbed(init, seed, scale=0.05):
    model = ForgeForCausalLM(init.config)
    model.load_state_dict(init.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("seeds, diverged", [((1, 2, 3), True), ((1, 1, 1), False), ((1, 2, 2), False)])
def test_diversity_check_in_both_directions(tiny_config, tiny_tokenizer, seeds, diverged):
    """Differently perturbed models pass the divergence check; clones (or one cloned pair) fail it."""
    from trainers.diversity import diversity_report

    torch.manual_seed(0)
    init = ForgeForCausalLM(tiny_config(vocab_size=len(tiny_tokenizer))).eval()
    models = {name: _perturbed(init, seed) for name, seed in zip(("reasoning", "memory", "speed"), seeds, strict=True)}
    blocks = torch.randint(0, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    report = diversity_report(models, init, tiny_tokenizer, text_blocks=blocks)
    assert report["diverged"] is diverged
    for pair, values in report["pairs"].items():
        a, b = pair.split("|")
        same = seeds[["reasoning", "memory", "speed"].index(a)] == seeds[["reasoning", "memory", "speed"].index(b)]
        assert values["different"] is (not same), (pair, values)
