"""Outside control of training (trainers/control.py) and tracking of non-Trainer loops (trainers/tracking.py)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from modeling_forge import ForgeForCausalLM
from trainers.base import ForgeTrainer, ForgeTrainingArguments
from trainers.control import CONTROL_DIR_ENV, PAUSED_EXIT_CODE, PauseRequested, pause_point, write_json_atomic
from trainers.tracking import LoopTracker, requested_backends


def _data(vocab: int, n: int = 48, length: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


class RequestPauseAt(TrainerCallback):
    """Plays the dashboard: writes the pause request at the end of step `step`."""

    def __init__(self, folder: Path, step: int) -> None:
        self.folder, self.step = folder, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            write_json_atomic(self.folder / "control.json", {"action": "pause"})


def _trainer(tiny_config, tmp_path, max_steps=6, callbacks=()):
    torch.manual_seed(0)
    model = ForgeForCausalLM(tiny_config())
    args = ForgeTrainingArguments(
        output_dir=str(tmp_path / "work"), max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, optimizer_type="mugrokfast",
        mugrokfast_phase=1,
    )  # fmt: skip
    return ForgeTrainer(
        model=model, args=args, train_dataset=_data(model.config.vocab_size), callbacks=list(callbacks)
    )


def test_pause_checkpoints_and_exits_then_resume_equals_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    straight = _trainer(tiny_config, tmp_path / "straight")
    straight.train()
    assert not list((tmp_path / "straight" / "work").glob("checkpoint-*"))  # no controller: no pause checkpoint

    control = tmp_path / "control"
    monkeypatch.setenv(CONTROL_DIR_ENV, str(control))
    paused = _trainer(tiny_config, tmp_path / "paused", callbacks=[RequestPauseAt(control, 2)])
    with pytest.raises(PauseRequested) as stopped:
        paused.train()
    assert stopped.value.code == PAUSED_EXIT_CODE
    checkpoint = tmp_path / "paused" / "work" / "checkpoint-2"  # the request came before ControlCallback's turn
    assert stopped.value.where.endswith("checkpoint-2") and (checkpoint / "model.safetensors").exists()
    progress = json.loads((control / "progress.json").read_text())
    assert progress["step"] == 2 and progress["max_steps"] == 6 and progress["paused_at"].endswith("checkpoint-2")

    (control / "control.json").unlink()  # the controller clears the request before resuming
    resumed = _trainer(tiny_config, tmp_path / "paused")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((control / "progress.json").read_text())["finished"] is True


def test_pause_point_of_a_loop(tmp_path, monkeypatch):
    pause_point("generation 0")  # no controller attached: nothing happens
    monkeypatch.setenv(CONTROL_DIR_ENV, str(tmp_path))
    pause_point("generation 1", step=1, max_steps=5)
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 1
    write_json_atomic(tmp_path / "control.json", {"action": "pause"})
    with pytest.raises(PauseRequested, match=str(PAUSED_EXIT_CODE)):
        pause_point("generation 2", step=2, max_steps=5)
    assert json.loads((tmp_path / "progress.json").read_text())["paused_at"] == "generation 2"


def test_requested_backends():
    assert requested_backends("none") == [] and requested_backends(None) == []
    assert requested_backends(["trackio", "wandb"]) == ["trackio", "wandb"]
    assert requested_backends(["trackio", "mlflow"]) == ["trackio"]  # Trainer's other integrations: not ours
    with pytest.raises(ValueError, match="unknown backends"):
        requested_backends(["trackoi"], strict=True)


def test_loop_tracker_without_backends_is_silent(tmp_path):
    tracker = LoopTracker("none", project="forge", run_name="x")
    tracker.log({"a": 1.0}, step=0)
    tracker.finish()
    assert tracker.backends == [] and not list(tmp_path.iterdir())
