"""A local stand-in for the Hugging Face Hub's HTTP API, for tests that push without the network.

Hand-written (no kept library ships a fake Hub server): it answers the endpoints `huggingface_hub` uses to create a
repo and upload a folder (`whoami-v2`, `repos/create`, `validate-yaml`, `preupload`, `commit`), tells the client to
send every file as a regular git blob (base64 in the commit payload, so no LFS or xet storage is needed), rejects card
metadata the Hub rejects (a local-path `base_model`), and records what it received so a test can assert the repo
creation and every uploaded file byte for byte.

    with FakeHub(user="alice") as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # or HF_ENDPOINT in a subprocess
        ...
        assert hub.files["alice/run-phase4"]["model.safetensors"] == expected_bytes
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def card_metadata_errors(readme: str) -> list[str]:
    """What the Hub rejects in a card's YAML front matter that our cards could get wrong: a `base_model` that is not
    a Hub model id (a local path such as `outputs/tiny/phase3` or `/tmp/x`)."""
    import yaml
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not readme.startswith("---\n"):
        return []
    metadata = yaml.safe_load(readme.split("---\n", 2)[1]) or {}
    base = metadata.get("base_model") or []
    errors = []
    for item in [base] if isinstance(base, str) else base:
        try:
            validate_repo_id(item)
        except HFValidationError:
            errors.append(f'"base_model" must be a Hub model id, got {item!r}')
    return errors


class FakeHub:
    """Serve a minimal Hub API on 127.0.0.1 in a background thread; records repos, commits and files."""

    def __init__(self, user: str = "alice", token: str = "hf_fake_token") -> None:
        self.user = user
        self.token = token
        self.created: list[dict] = []  # bodies of POST /api/repos/create
        self.commits: dict[str, list[str]] = {}  # repo id -> commit summaries
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _reply(self, status: int, payload: dict | None = None) -> None:
                body = json.dumps(payload or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                hub.requests.append(("GET", self.path))
                if self.path.startswith("/api/whoami-v2"):
                    if self._authorised():
                        self._reply(200, {"type": "user", "name": hub.user, "orgs": [], "auth": {}})
                    return
                self._reply(404, {"error": f"not served by the fake Hub: GET {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                hub.requests.append(("POST", self.path))
                if not self._authorised():
                    return
                body = self._body()
                if self.path == "/api/validate-yaml":
                    errors = card_metadata_errors(json.loads(body)["content"])
                    self._reply(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
                    return
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.created.append(request)
                    repo_id = f"{request.get('organization') or hub.user}/{request['name']}"
                    status = 409 if repo_id in hub.files else 200
                    hub.files.setdefault(repo_id, {})
                    self._reply(status, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                    return
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/?]+).*", self.path)
                if match is None:
                    self._reply(404, {"error": f"not served by the fake Hub: POST {self.path}"})
                    return
                repo_id, action, _revision = match.groups()
                if repo_id not in hub.files:
                    self._reply(404, {"error": f"Repository {repo_id} not found"})
                    return
                if action == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    self._reply(200, {"files": modes, "commitOid": "0" * 40})
                    return
                summary = ""
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"].get("summary", "")
                    elif item["key"] == "file":
                        value = item["value"]
                        hub.files[repo_id][value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        hub.files[repo_id].pop(item["value"]["path"], None)
                hub.commits.setdefault(repo_id, []).append(summary)
                oid = f"{len(hub.commits[repo_id]):040x}"
                self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

        return Handler
