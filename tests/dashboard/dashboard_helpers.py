"""Helpers of the dashboard tests: a tiny Phase 1 config, waiting on the API, comparing checkpoints."""

import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

TINY_PHASE1 = Path(__file__).with_name("phase1_dashboard_tiny.yaml")
TINY_PIPELINE = Path(__file__).with_name("pipeline_dashboard_tiny.yaml")


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `predicate()` until it returns something truthy; fail the test naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def phase_status(client, number: int) -> dict:
    response = client.get(f"/api/phases/{number}/status")
    assert response.status_code == 200, response.text
    return response.json()


def max_weight_difference(folder_a: Path, folder_b: Path) -> float:
    """Largest absolute difference between two checkpoints' tensors (they must hold the same names)."""
    a, b = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


__all__ = ["TINY_PHASE1", "TINY_PIPELINE", "max_weight_difference", "phase_status", "wait_for"]
