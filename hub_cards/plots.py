"""Small matplotlib helpers for the plots phases put in their output folders (headless, Agg backend)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(
    path: str | Path, series: dict[str, tuple[list[float], list[float]]], *, title: str, xlabel: str, ylabel: str
) -> Path:
    """Write a PNG with one line per series; `series` maps a label to (x values, y values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, (xs, ys) in series.items():
        axis.plot(xs, ys, label=label)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if len(series) > 1:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
