"""Command line of the dashboard: serve one run folder.

    python -m dashboard --run outputs/tiny --port 8765
    agent-forge-dashboard --run outputs/tiny --config 1=recipes/configs/phase1_tiny.yaml
    agent-forge-dashboard --run outputs/25m --preset cognate25m --host 0.0.0.0   # prints the token to use

Binds 127.0.0.1 unless told otherwise; on any other address every control request needs the token (given with
--token or FORGE_DASHBOARD_TOKEN, else generated and printed).
"""

import argparse
import ipaddress
import os
import secrets
import sys
from pathlib import Path

import uvicorn

from .app import create_app
from .controller import REPO_ROOT, Controller


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="The run folder (the phases' output_dir), e.g. outputs/tiny.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8765, help="Port (default 8765).")
    parser.add_argument("--preset", default="tiny", help="Config preset: recipes/configs/phaseN_<preset>.yaml.")
    parser.add_argument(
        "--pipeline",
        default=None,
        help="Pipeline YAML whose runner (recipes/pipeline.py) runs the phases; default: "
        "recipes/configs/pipeline_<preset>.yaml when it exists.",
    )
    parser.add_argument("--no-pipeline", action="store_true", help="Run each phase's own recipe instead.")
    parser.add_argument("--config", action="append", default=[], metavar="N=FILE",
                        help="The YAML of phase N (repeatable); overrides --preset for that phase.")  # fmt: skip
    parser.add_argument(
        "--token",
        default=os.environ.get("FORGE_DASHBOARD_TOKEN"),
        help="Token for control requests (default: FORGE_DASHBOARD_TOKEN; generated off loopback).",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    configs = {}
    for item in args.config:
        number, sep, path = item.partition("=")
        if not sep or not number.isdigit():
            sys.exit(f"--config {item!r}: expected N=FILE, e.g. --config 1=recipes/configs/phase1_tiny.yaml")
        configs[int(number)] = path
    token = args.token
    if token is None and not is_loopback(args.host):
        token = secrets.token_urlsafe(24)
    pipeline = args.pipeline or REPO_ROOT / "recipes" / "configs" / f"pipeline_{args.preset}.yaml"
    if args.no_pipeline or not Path(pipeline).exists():
        pipeline = None
    controller = Controller(args.run, preset=args.preset, configs=configs, pipeline=pipeline)
    url = f"http://{args.host}:{args.port}/"
    print(f"Agent Forge dashboard for {controller.run_dir}: {url}" + (f"#token={token}" if token else ""))
    print(f"Phases run through {controller.pipeline or 'their own recipes (recipes/phaseN.py)'}.")
    if token:
        print(f"Control requests need 'Authorization: Bearer {token}'.")
    uvicorn.run(create_app(controller, token=token), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
