"""Model cards for phase outputs, rendered only from the files a run wrote (see `render.py`)."""

from .plots import line_plot
from .render import available_templates, render_card, write_card

__all__ = ["available_templates", "line_plot", "render_card", "write_card"]
