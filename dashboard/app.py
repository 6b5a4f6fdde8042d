"""The Starlette app: the JSON API, the event stream (server-sent events), the run folder's files and the page.

    GET  /api/pipeline/status             every phase's status, progress and outcome
    GET  /api/phases/{n}/status           one phase: status, progress, finished models, its reports
    GET  /api/phases/{n}/metrics          the phase's tracked metrics per run ({run: {name: [[step, value]]}})
    GET  /api/phases/{n}/card?folder=F    the model card of one finished model folder, as HTML
    POST /api/phases/{n}/configure        JSON object of config fields, validated by the phase's config class (422)
    POST /api/phases/{n}/start|pause|resume|stop
    POST /api/pipeline/start|stop         every unfinished phase, then the shared evaluation (with a pipeline YAML)
    GET  /api/events?since=ID             the event log after ID, as JSON
    GET  /api/stream?since=ID             the same as server-sent events, live (`limit=N` closes after N)
    GET  /files/{path}                    a file of the run folder (nothing outside it)

Control requests (POST) need `Authorization: Bearer <token>` when the app has a token (always when it listens on
anything but loopback), and a JSON content type, so a page on another site cannot send them with a plain form.
"""

import asyncio
import hmac
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .controller import ConfigError, Conflict, Controller, EventHub
from .phases import PHASES, get_phase
from .runfolder import OutsideRunFolder, model_summary, read_report, render_card, safe_path

STATIC_DIR = Path(__file__).resolve().parent / "static"
ACTIONS = ("start", "pause", "resume", "stop", "configure")


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def create_app(controller: Controller, *, token: str | None = None, poll_interval_s: float = 0.5,
               start_events: bool = True) -> Starlette:  # fmt: skip
    """The dashboard app over `controller`; `token` guards every control endpoint."""
    hub = EventHub(controller, interval_s=poll_interval_s)
    run_dir = controller.run_dir

    def phase_or_404(request: Request):
        number = request.path_params["n"]
        try:
            return get_phase(number)
        except KeyError as error:
            raise LookupError(str(error)) from None

    async def pipeline_status(request: Request) -> JSONResponse:
        status = controller.pipeline_status()
        info = {n: {"name": spec.name, "charts": spec.charts} for n, spec in PHASES.items()}
        status.update({"last_event_id": hub.last_id, "token_required": token is not None, "phases_info": info,
                       "pipeline_config": str(controller.pipeline) if controller.pipeline else None})  # fmt: skip
        return JSONResponse(status)

    async def phase_status(request: Request) -> JSONResponse:
        spec = phase_or_404(request)
        status = controller.phase_status(spec.number)
        status["models"] = [model_summary(folder, run_dir) for folder in spec.model_folders(run_dir)]
        status["reports"] = {name: read_report(run_dir / name) for name in spec.reports}
        status["charts"] = spec.charts
        return JSONResponse(status)

    async def phase_metrics(request: Request) -> JSONResponse:
        spec = phase_or_404(request)
        wanted = set(request.query_params.get("names", "").split(",")) - {""}
        runs: dict[str, dict[str, list]] = {}
        for row in hub.reader.metrics():
            if row["phase"] != spec.number:
                continue
            series = runs.setdefault(row["run"], {})
            for name, value in row["metrics"].items():
                if not wanted or name in wanted:
                    series.setdefault(name, []).append([row["step"], value])
        return JSONResponse({"phase": spec.number, "runs": runs})

    async def phase_card(request: Request) -> JSONResponse:
        spec = phase_or_404(request)
        folders = {f.resolve().relative_to(run_dir).as_posix(): f for f in spec.model_folders(run_dir)}
        name = request.query_params.get("folder") or next(iter(folders), None)
        if name not in folders or not (folders[name] / "README.md").exists():
            return _error(404, f"No model card for {name!r} in phase {spec.number}.", folders=sorted(folders))
        return JSONResponse(render_card(folders[name], run_dir))

    def check_request(request: Request) -> JSONResponse | None:
        """The token (when the app has one) and a JSON content type, for every control request."""
        if token is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "A token is required. Fix: send 'Authorization: Bearer <token>'.")
        if "application/json" not in request.headers.get("content-type", ""):
            return _error(415, "Control requests must be JSON. Fix: send 'Content-Type: application/json'.")
        return None

    async def control(request: Request) -> JSONResponse:
        refused = check_request(request)
        if refused is not None:
            return refused
        spec = phase_or_404(request)
        action = request.path_params["action"]
        if action not in ACTIONS:
            return _error(404, f"Unknown action {action!r}. Actions: {list(ACTIONS)}.")
        try:
            body = await request.json() if await request.body() else {}
        except json.JSONDecodeError as error:
            return _error(400, f"The body is not JSON: {error}.")
        hub.poll_once()  # the state before the action (e.g. "paused" before a resume) reaches the stream first
        try:
            if action == "configure":
                result = {"overrides": controller.configure(spec.number, body)}
            elif action == "start":
                result = controller.start(spec.number)
            else:
                result = getattr(controller, action)(spec.number)
        except ConfigError as error:
            return _error(422, str(error), field=error.field)
        except Conflict as error:
            return _error(409, str(error))
        hub.poll_once()  # the state change shows up in the stream at once
        return JSONResponse(result)

    async def pipeline_control(request: Request) -> JSONResponse:
        refused = check_request(request)
        if refused is not None:
            return refused
        action = request.path_params["action"]
        try:
            if action == "start":
                result = controller.start(None)
            elif action == "stop" and controller.live_phase() is not None:
                result = controller.stop(controller.live_phase())
            else:
                return _error(404, f"Unknown pipeline action {action!r}. Actions: start, stop.")
        except Conflict as error:
            return _error(409, str(error))
        hub.poll_once()
        return JSONResponse(result)

    async def events(request: Request) -> JSONResponse:
        since = int(request.query_params.get("since", 0))
        return JSONResponse({"events": hub.since(since), "last_event_id": hub.last_id})

    async def stream(request: Request) -> StreamingResponse:
        since = int(request.query_params.get("since", request.headers.get("last-event-id", hub.last_id)))
        limit = int(request.query_params.get("limit", 0)) or None

        async def generate():
            nonlocal since
            sent = 0
            yield ": forge dashboard event stream\n\n"
            while True:
                for event in hub.since(since):
                    yield f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
                    since, sent = event["id"], sent + 1
                    if limit is not None and sent >= limit:
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.25)

        return StreamingResponse(generate(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def files(request: Request) -> Response:
        try:
            path = safe_path(run_dir, request.path_params["path"])
        except OutsideRunFolder:
            return _error(404, "Not found.")
        if not path.is_file():
            return _error(404, "Not found.")
        return FileResponse(path)

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    def lifespan_events(app):
        import contextlib

        @contextlib.asynccontextmanager
        async def lifespan(app):
            if start_events:
                hub.start()
            try:
                yield
            finally:
                hub.stop()
                controller.shutdown()

        return lifespan(app)

    routes = [
        Route("/", index),
        Route("/api/pipeline/status", pipeline_status),
        Route("/api/pipeline/{action:str}", pipeline_control, methods=["POST"]),
        Route("/api/phases/{n:int}/status", phase_status),
        Route("/api/phases/{n:int}/metrics", phase_metrics),
        Route("/api/phases/{n:int}/card", phase_card),
        Route("/api/phases/{n:int}/{action:str}", control, methods=["POST"]),
        Route("/api/events", events),
        Route("/api/stream", stream),
        Route("/files/{path:path}", files),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan_events, exception_handlers={LookupError: not_found})
    app.state.hub = hub
    app.state.controller = controller
    return app


__all__ = ["create_app"]
