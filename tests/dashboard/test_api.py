"""The dashboard API over a run folder on disk (Starlette's TestClient; no phase is started here)."""

import json
import re
from pathlib import Path

import pytest
from dashboard_helpers import TINY_PHASE1
from starlette.testclient import TestClient

from dashboard import Controller, create_app
from dashboard.__main__ import is_loopback, make_parser
from dashboard.runfolder import OutsideRunFolder, TrackioReader, safe_path

CARD = """---
library_name: transformers
tags: [agent-forge]
---
# forge-phase1-reasoning

Validation perplexity **151.0**.

![loss](plots/loss.png)

<script>alert(1)</script>
"""


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder as Phase 1 leaves it: one finished model folder with card and plot, and the diversity report."""
    run = tmp_path / "run"
    model = run / "phase1" / "reasoning"
    (model / "plots").mkdir(parents=True)
    (model / "forge_lineage.json").write_text(json.dumps({"model_name": "forge-phase1-reasoning", "wall_time_s": 12.0,
                                                          "metrics": {"eval/perplexity": 151.0}}))  # fmt: skip
    (model / "README.md").write_text(CARD)
    (model / "plots" / "loss.png").write_bytes(b"\x89PNG fake")
    (run / "phase1" / "diversity_report.json").write_text(json.dumps({"diverged": True, "pairs": {}}))
    (tmp_path / "secret.txt").write_text("outside the run folder")
    return run


@pytest.fixture
def client(run_dir):
    app = create_app(Controller(run_dir, configs={1: TINY_PHASE1}), start_events=False)
    with TestClient(app) as client:
        yield client


def test_pipeline_and_phase_status_read_from_the_run_folder(client):
    status = client.get("/api/pipeline/status").json()
    assert [(p["phase"], p["status"]) for p in status["phases"]] == [
        (1, "finished"), (2, "pending"), (3, "pending"), (4, "pending"), (5, "pending"), (6, "pending"),
    ]  # fmt: skip
    assert status["token_required"] is False and status["last_event_id"] == 0
    phase1 = client.get("/api/phases/1/status").json()
    assert phase1["reports"]["phase1/diversity_report.json"] == {"diverged": True, "pairs": {}}
    (model,) = phase1["models"]
    assert model["folder"] == "phase1/reasoning" and model["metrics"] == {"eval/perplexity": 151.0}
    assert model["plots"] == ["/files/phase1/reasoning/plots/loss.png"]
    assert client.get(model["plots"][0]).content == b"\x89PNG fake"
    assert client.get("/api/phases/7/status").status_code == 404


def test_model_card_is_html_with_images_from_the_run_folder_and_no_raw_html(client):
    card = client.get("/api/phases/1/card", params={"folder": "phase1/reasoning"}).json()
    assert "library_name: transformers" in card["front_matter"]
    assert "<strong>151.0</strong>" in card["html"]
    assert 'src="/files/phase1/reasoning/plots/loss.png"' in card["html"]
    assert "<script>" not in card["html"] and "&lt;script&gt;" in card["html"]
    assert client.get("/api/phases/1/card", params={"folder": "../secret"}).status_code == 404
    assert client.get("/api/phases/2/card").status_code == 404  # nothing finished yet


def test_configure_validates_against_the_phase_config_class(client):
    def configure(fields):
        return client.post("/api/phases/1/configure", json=fields)

    unknown = configure({"max_stepz": 10})
    assert unknown.status_code == 422 and unknown.json()["field"] == "max_stepz"
    wrong_type = configure({"max_steps": "ten"})
    assert wrong_type.status_code == 422 and wrong_type.json()["field"] == "max_steps"
    refused = configure({"rollback_lr_factor": 3.0})  # CognateConfig.__post_init__ refuses it
    assert refused.status_code == 422 and refused.json()["field"] == "rollback_lr_factor"
    assert "(0, 1]" in refused.json()["error"]
    not_positive = configure({"max_steps": -1})
    assert not_positive.status_code == 422 and not_positive.json()["field"] == "max_steps"
    assert configure({}).status_code == 422
    good = configure({"max_steps": 12, "learning_rate": 0.002})
    assert good.status_code == 200 and good.json()["overrides"] == {"max_steps": 12, "learning_rate": 0.002}
    assert client.get("/api/phases/1/status").json()["overrides"] == {"max_steps": 12, "learning_rate": 0.002}


def test_control_requests_refused_when_they_do_not_fit(client):
    assert client.post("/api/phases/1/start", json={}).status_code == 409  # already finished
    assert client.post("/api/phases/2/pause", json={}).status_code == 409  # not running
    assert client.post("/api/phases/2/resume", json={}).status_code == 409  # nothing paused
    assert client.post("/api/phases/2/stop", json={}).status_code == 409
    assert client.post("/api/phases/1/explode", json={}).status_code == 404
    form = client.post("/api/phases/1/configure", data={"max_steps": "3"})  # a cross-site form cannot send JSON
    assert form.status_code == 415


def test_a_token_guards_every_control_endpoint(run_dir):
    app = create_app(Controller(run_dir, configs={1: TINY_PHASE1}), token="s3cret", start_events=False)
    with TestClient(app) as client:
        for action in ("start", "pause", "resume", "stop", "configure"):
            assert client.post(f"/api/phases/2/{action}", json={}).status_code == 401
            wrong = client.post(f"/api/phases/2/{action}", json={}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
        allowed = client.post("/api/phases/2/pause", json={}, headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 409  # past the token check: phase 2 is simply not running
        assert client.get("/api/pipeline/status").json()["token_required"] is True


def test_binds_loopback_by_default():
    assert make_parser().parse_args(["--run", "x"]).host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


@pytest.mark.parametrize(
    "path",
    ["../secret.txt", "%2e%2e/secret.txt", "..%2fsecret.txt", "phase1/../../secret.txt", "%2fetc%2fpasswd",
     "phase1/reasoning/link.txt"],
)  # fmt: skip
def test_no_file_outside_the_run_folder_is_served(client, run_dir, path):
    (run_dir / "phase1" / "reasoning" / "link.txt").symlink_to(run_dir.parent / "secret.txt")
    response = client.get(f"/files/{path}")
    assert response.status_code == 404 and b"outside the run folder" not in response.content
    assert client.get("/files/phase1/diversity_report.json").status_code == 200


def test_safe_path(run_dir):
    assert safe_path(run_dir, "phase1/reasoning") == (run_dir / "phase1" / "reasoning").resolve()
    for bad in ("..", "../secret.txt", "/etc/passwd", "phase1/../../x", "a\x00b"):
        with pytest.raises(OutsideRunFolder):
            safe_path(run_dir, bad)


def test_the_page_and_its_chart_library_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "uPlot.iife.min.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/vendor/uPlot.iife.min.js").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def log_generations(run_dir: Path, monkeypatch, steps: range, alert: str | None = None) -> None:
    """Log EvoMerge-like generations through `LoopTracker` into `<run_dir>/trackio` (trackio's real SQLite store)."""
    import trackio.sqlite_storage
    import trackio.utils

    from trainers.tracking import LoopTracker, send_alert

    for module in (trackio.sqlite_storage, trackio.utils):  # TRACKIO_DIR is read once, at trackio's import
        monkeypatch.setattr(module, "TRACKIO_DIR", run_dir / "trackio")
    tracker = LoopTracker(["trackio"], project="forge", run_name="tiny-phase2", config={"population_size": 4})
    for step in steps:
        tracker.log({"evomerge/best": 0.5 + 0.1 * step}, step=step)
    if alert:
        send_alert(alert, "no gain for 3 generations", step=steps[-1])
    tracker.finish()
    send_alert("after_finish", "no run is active: nothing is recorded")


def test_loop_tracker_logs_to_trackio_where_the_dashboard_reads(run_dir, monkeypatch):
    """A non-Trainer loop's metrics and alerts land in trackio's database, where the dashboard reads them."""
    log_generations(run_dir, monkeypatch, range(3), alert="fitness_stalled")
    reader = TrackioReader(run_dir)
    rows = reader.metrics()
    assert [(r["run"], r["phase"], r["step"], r["metrics"]["evomerge/best"]) for r in rows] == [
        ("tiny-phase2", 2, 0, 0.5), ("tiny-phase2", 2, 1, 0.6), ("tiny-phase2", 2, 2, pytest.approx(0.7)),
    ]  # fmt: skip
    assert [(a["title"], a["level"], a["phase"]) for a in reader.alerts()] == [("fitness_stalled", "warn", 2)]
    assert reader.metrics(after={"forge": rows[-1]["id"]}) == []


def test_event_log_reports_metrics_and_alerts_in_order(run_dir, monkeypatch):
    """The hub turns new trackio rows into `metric` then `alert` events with increasing ids; old rows are history."""
    log_generations(run_dir, monkeypatch, range(2))
    app = create_app(Controller(run_dir, configs={1: TINY_PHASE1}), start_events=False)
    with TestClient(app) as client:
        hub = app.state.hub
        hub.poll_once()
        assert client.get("/api/events").json()["events"] == []  # rows written before the service started
        history = client.get("/api/phases/2/metrics", params={"names": "evomerge/best"}).json()
        assert history["runs"] == {"tiny-phase2": {"evomerge/best": [[0, 0.5], [1, 0.6]]}}
        log_generations(run_dir, monkeypatch, range(2, 4), alert="stalled")
        hub.poll_once()
        events = client.get("/api/events").json()["events"]
        assert [(e["id"], e["type"], e["phase"]) for e in events] == [
            (1, "metric", 2), (2, "metric", 2), (3, "alert", 2),
        ]  # fmt: skip
        assert [e["data"]["step"] for e in events[:2]] == [2, 3]
        assert client.get("/api/events", params={"since": 2}).json()["events"] == events[2:]
        with client.stream("GET", "/api/stream", params={"since": 0, "limit": 3}) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith(("id:", "event:"))]
        assert lines == ["id: 1", "event: metric", "id: 2", "event: metric", "id: 3", "event: alert"]


def test_statuses_from_the_pipeline_runner_state(run_dir, client):
    """pipeline_state.json (the runner's live state) decides where no child of this service ran the phase."""
    state = {"status": "failed", "current_phase": None, "phases": {
        "2": {"number": 2, "status": "failed", "error": "PauseRequested: 75"},
        "3": {"number": 3, "status": "running", "error": None},
        "4": {"number": 4, "status": "failed", "error": "RuntimeError: out of memory"},
        "5": {"number": 5, "status": "skipped", "note": "outside the requested range"},
    }}  # fmt: skip
    (run_dir / "pipeline_state.json").write_text(json.dumps(state))
    status = client.get("/api/pipeline/status").json()
    assert [p["status"] for p in status["phases"]] == ["finished", "paused", "interrupted", "failed", "pending",
                                                       "pending"]  # fmt: skip
    assert status["runner"]["status"] == "failed" and status["report"] is None
    assert client.post("/api/phases/5/resume", json={}).status_code == 409  # pending: nothing to resume
    assert client.post("/api/pipeline/start", json={}).status_code == 409  # this service has no pipeline YAML
    assert client.post("/api/pipeline/stop", json={}).status_code == 404  # nothing running


def test_no_other_package_imports_the_dashboard():
    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(path.relative_to(root))
        for package in ("modeling_forge", "trainers", "evaluation", "hub_cards", "recipes", "benchmarks")
        for path in (root / package).rglob("*.py")
        if re.search(r"^\s*(from|import)\s+dashboard\b", path.read_text(), re.MULTILINE)
    ]
    assert offenders == []
