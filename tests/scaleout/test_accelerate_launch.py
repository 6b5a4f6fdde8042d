"""Every phase recipe (1-4) and the quickstart under `accelerate launch` with two CPU processes (gloo).

Data-parallel where the phase trains: every `Trainer.train` ends with the same parameters on both ranks. Main process
only where it searches or writes: rank 1 runs no Phase 2 fitness evaluation and writes no output folder. The launch
flags are the ones that really start two CPU processes (`--cpu --num_processes 2` silently starts one; see
FACTS.md); tests/scaleout/launch_recipe.py records what each rank did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import modeling_forge  # noqa: F401  (Auto classes for the loads below)
from tests.crash.test_crash_resume import PHASE1_ARGS, _phase2_args, _phase3_args, _phase4_args

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
_PORT = iter(range(29561, 29600))


def _launch(phase: str, record: Path, args: list[str], extra: list[str] = ()) -> list[dict]:
    """Run the recipe on two processes; returns each rank's record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    command = [*LAUNCH, *extra, "--main_process_port", str(next(_PORT)), str(REPO / "tests/scaleout/launch_recipe.py"),
               phase, str(record), "--", *args]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads((record / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["world_size"] for r in records] == [2, 2]  # really two processes
    return records


def _data_parallel(records: list[dict], runs: int) -> None:
    """Both ranks trained the same runs for the same steps and ended with identical parameters."""
    trained = [r["trained"] for r in records]
    assert len(trained[0]) == runs and trained[0] == trained[1], trained


@pytest.fixture(scope="module")
def phase1_two_processes(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("ddp1")
    records = _launch("1", root / "records", [*PHASE1_ARGS, "--output_dir", str(root)])
    return root, records


def test_phase1_trains_data_parallel_and_writes_once(phase1_two_processes):
    root, records = phase1_two_processes
    _data_parallel(records, runs=3)  # reasoning, memory, speed
    assert records[0]["writes"] == ["init", "reasoning", "memory", "speed"] and records[1]["writes"] == []
    assert all(step["steps"] == 4 for step in records[0]["trained"])
    for name in ("init", "reasoning", "memory", "speed"):
        AutoModelForCausalLM.from_pretrained(root / "phase1" / name)
    assert not (root / "phase1" / ".work").exists()


def test_phase2_searches_on_the_main_process_only(phase1_two_processes, tmp_path):
    phase1, _ = phase1_two_processes
    records = _launch("2", tmp_path / "records", _phase2_args(phase1)(tmp_path))
    assert records[0]["fitness_calls"] > 0 and records[1]["fitness_calls"] == 0
    assert records[0]["writes"] == ["champion"] and records[1]["writes"] == []
    lines = (tmp_path / "phase2" / "evolution.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 4  # each candidate once: 3 generations x 4
    AutoModelForCausalLM.from_pretrained(tmp_path / "phase2" / "champion")


def test_phase3_bakes_and_trains_data_parallel_and_writes_once(phase1_two_processes, tmp_path):
    phase1, _ = phase1_two_processes
    records = _launch("3", tmp_path / "records", _phase3_args(phase1)(tmp_path))
    _data_parallel(records, runs=2)  # the step-1 bake, the step-2 RL
    assert records[0]["writes"] == ["phase3"] and records[1]["writes"] == []
    AutoModelForCausalLM.from_pretrained(tmp_path / "phase3")


def test_phase4_fine_tunes_data_parallel_and_writes_once(phase1_two_processes, tmp_path):
    phase1, _ = phase1_two_processes
    records = _launch("4", tmp_path / "records", _phase4_args(phase1)(tmp_path))
    _data_parallel(records, runs=1)
    assert records[0]["writes"] == ["phase4"] and records[1]["writes"] == []
    AutoModelForCausalLM.from_pretrained(tmp_path / "phase4")
    assert not (tmp_path / ".phase4-work").exists()


def test_quickstart_trains_data_parallel_and_writes_once(corpus_ready, tmp_path):
    args = ["--output_dir", str(tmp_path / "demo"), "--max_steps", "4", "--batch_size", "2", "--block_size", "64",
            "--vocab_size", "320", "--tokenizer_chars", "60000", "--train_chars", "20000", "--eval_tokens", "300",
            "--sample_tokens", "4"]  # fmt: skip
    records = _launch("quickstart", tmp_path / "records", args)
    _data_parallel(records, runs=1)
    assert records[0]["writes"] == ["demo"] and records[1]["writes"] == []
    assert json.loads((tmp_path / "demo" / "quickstart_results.json").read_text())["round_trip_exact"]
