"""Agent Forge dashboard: a local service that runs the phases of one run folder in a child process and shows them.

`python -m dashboard --run outputs/tiny` serves the API (status, configure, start/pause/resume/stop), an event
stream (progress, metric, alert, complete) and one static page. It reads the run folder and the trackio database the
phases log to; no other package imports this one.
"""

from .app import create_app
from .controller import ConfigError, Conflict, Controller, EventHub

__all__ = ["ConfigError", "Conflict", "Controller", "EventHub", "create_app"]
