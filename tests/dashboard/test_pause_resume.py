"""Pause and resume through the API on a real tiny Phase 1 run: the result equals an uninterrupted run, and the
event stream reports it in order. Each run is a child process (about 30-60 s on a shared 2-core machine)."""

from pathlib import Path

import pytest
from dashboard_helpers import TINY_PHASE1, TINY_PIPELINE, max_weight_difference, phase_status, wait_for
from starlette.testclient import TestClient

from dashboard import Controller, create_app

pytestmark = pytest.mark.slow
SPECIALISATIONS = ("speed",)


def run_phase1(tmp_path, name: str, pause_at_step: int | None, pipeline=None):
    """Run the tiny Phase 1 through the API (pausing once at `pause_at_step` or later); return the event log."""
    controller = Controller(tmp_path / name, configs={1: TINY_PHASE1}, pipeline=pipeline)
    app = create_app(controller, poll_interval_s=0.1)
    with TestClient(app) as client:
        response = client.post("/api/phases/1/start", json={})
        assert response.status_code == 200, response.text
        assert client.post("/api/phases/1/start", json={}).status_code == 409  # one child at a time
        if pause_at_step is not None:
            wait_for(lambda: (phase_status(client, 1)["progress"] or {}).get("step", 0) >= pause_at_step, 120,
                     f"Phase 1 to reach step {pause_at_step}")  # fmt: skip
            assert client.post("/api/phases/1/pause", json={}).status_code == 200
            paused = wait_for(lambda: (s := phase_status(client, 1))["status"] == "paused" and s, 120, "the pause")
            checkpoint = paused["progress"]["paused_at"]
            assert (Path(checkpoint) / "model.safetensors").exists(), checkpoint
            assert client.post("/api/phases/1/pause", json={}).status_code == 409  # nothing running
            assert client.post("/api/phases/1/resume", json={}).status_code == 200
        wait_for(lambda: phase_status(client, 1)["status"] in ("finished", "failed"), 300, "Phase 1 to end")
        status = phase_status(client, 1)
        assert status["status"] == "finished", status["outcome"]
        wait_for(lambda: any(e["type"] == "complete" for e in client.get("/api/events").json()["events"]), 10,
                 "the complete event")  # fmt: skip
        events = client.get("/api/events").json()["events"]
        assert {m["folder"] for m in status["models"]} == {"phase1/init", *(f"phase1/{s}" for s in SPECIALISATIONS)}
    return controller.run_dir, events, paused if pause_at_step is not None else None


def test_pause_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The uninterrupted run is the phase's own recipe; the paused one goes through the pipeline runner."""
    straight_dir, straight_events, _ = run_phase1(tmp_path, "straight", None)
    paused_dir, events, paused = run_phase1(tmp_path, "paused", pause_at_step=5, pipeline=TINY_PIPELINE)
    assert (paused_dir / "pipeline_state.json").exists() and not (straight_dir / "pipeline_state.json").exists()

    # The paused run stopped mid-training at a checkpoint, then continued from it.
    assert 5 <= paused["progress"]["step"] < paused["progress"]["max_steps"]
    # Its final weights equal the uninterrupted run's, bit for bit, for every specialisation.
    for name in SPECIALISATIONS:
        assert max_weight_difference(straight_dir / "phase1" / name, paused_dir / "phase1" / name) == 0.0

    # Event order: running -> progress/metrics -> paused -> running -> metrics -> complete (last), ids increasing.
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    phase_events = [e for e in events if e["phase"] == 1]
    statuses = [e["data"]["status"] for e in phase_events if e["type"] in ("status", "complete")]
    assert statuses == ["running", "pausing", "paused", "running", "finished"], statuses
    kinds = [e["type"] for e in phase_events]
    assert kinds[-1] == "complete" and kinds.count("complete") == 1
    pause_index = next(i for i, e in enumerate(phase_events) if e["data"].get("status") == "paused")
    assert "metric" in kinds[:pause_index] and "metric" in kinds[pause_index:]
    assert "progress" in kinds[:pause_index]
    steps = [e["data"]["step"] for e in phase_events if e["type"] == "progress" and e["data"]["run_name"].endswith(
        "speed")]  # fmt: skip
    assert steps == sorted(steps), "progress of one specialisation never goes backwards"
    metric = next(e for e in phase_events if e["type"] == "metric")
    assert metric["data"]["run"].endswith("phase1-speed") and "train/loss" in metric["data"]["metrics"]
    # The uninterrupted run reported no pause.
    assert [e["data"]["status"] for e in straight_events if e["type"] in ("status", "complete")] == [
        "running",
        "finished",
    ]
