"""The dashboard page in a real headless Chromium (Debian's `chromium` driven by playwright) during a tiny Phase 1 run:
configure, start, watch it run with a live chart, pause, resume, see it finish with its model card; screenshots are
saved as artefacts in `$FORGE_TEST_ARTIFACTS` (default: the test's tmp folder)."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from dashboard_helpers import TINY_PHASE1, TINY_PIPELINE

from dashboard import Controller, create_app

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("FORGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium, as root; `make test` does it)"
    return None


@pytest.fixture
def served_run(tmp_path):
    """The dashboard over a fresh run folder, served by uvicorn on a free loopback port in a background thread."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(tmp_path / "run", configs={1: TINY_PHASE1}, pipeline=TINY_PIPELINE)  # as the CLI does
    server = uvicorn.Server(uvicorn.Config(create_app(controller, poll_interval_s=0.2), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/", controller
    server.should_exit = True
    thread.join(timeout=60)


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_page_follows_and_controls_a_tiny_run(served_run, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, controller = served_run
    artifacts = Path(os.environ.get("FORGE_TEST_ARTIFACTS") or tmp_path / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        refused = []  # the one request the test makes fail on purpose (a bad configure field)
        page.on("response", lambda response: response.status >= 400 and refused.append(response.status))
        page.goto(url)
        phase = page.locator("#phase-1")
        badge = page.locator('[data-testid="status-1"]')
        expect(badge).to_have_text("pending", timeout=30_000)
        expect(page.locator("#connection")).to_have_text("live", timeout=30_000)

        # Configure through the page: a bad field is refused with its name, a good one kept.
        phase.locator("details.configure summary").click()
        phase.locator("details.configure textarea").fill('{"max_stepz": 5}')
        phase.locator("details.configure button").click()
        expect(phase.locator("details.configure .error")).to_contain_text("max_stepz", timeout=60_000)
        phase.locator("details.configure textarea").fill('{"max_steps": 80}')  # long enough to pause mid-run
        phase.locator("details.configure button").click()
        expect(phase.locator("details.configure .error")).to_contain_text("kept", timeout=30_000)

        phase.locator('button[data-action="start"]').click()
        expect(badge).to_have_text("running", timeout=60_000)
        page.wait_for_function("() => (window.forgeCharts['1:0']?.data[0].length ?? 0) >= 2", timeout=180_000)
        expect(phase.locator(".progress-text")).to_contain_text("step", timeout=30_000)
        page.screenshot(path=str(artifacts / "dashboard-mid-run.png"), full_page=True)

        phase.locator('button[data-action="pause"]').click()
        expect(badge).to_have_text("paused", timeout=180_000)
        expect(phase.locator(".progress-text")).to_contain_text("paused", timeout=30_000)
        paused_points = page.evaluate("() => window.forgeCharts['1:0'].data[0].length")
        page.screenshot(path=str(artifacts / "dashboard-paused.png"), full_page=True)

        phase.locator('button[data-action="resume"]').click()
        expect(badge).to_have_text("finished", timeout=300_000)
        expect(page.locator("#timeline-1 .badge")).to_have_text("finished")
        assert page.evaluate("() => window.forgeCharts['1:0'].data[0].length") > paused_points  # it went on
        card = phase.locator('.model[data-folder="phase1/speed"] details')
        card.locator("summary").click()
        expect(card.locator(".card")).to_contain_text("forge-phase1-speed", timeout=30_000)
        page.screenshot(path=str(artifacts / "dashboard-finished.png"), full_page=True)
        browser.close()
    assert refused == [422], refused
    assert [e for e in errors if "status of 422" not in e] == [], errors
    assert controller.outcomes[1]["status"] == "finished"
    shots = os.environ.get("FORGE_DASHBOARD_SHOTS")  # optional copy for a reviewer
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        for name in ("dashboard-mid-run.png", "dashboard-paused.png", "dashboard-finished.png"):
            shutil.copy(artifacts / name, Path(shots) / name)
