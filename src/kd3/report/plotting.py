"""Matplotlib on the Agg canvas directly: no pyplot, so no global backend or figure state."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def panels(count: int, columns: int = 3, size: tuple[float, float] = (4.4, 3.3)) -> tuple[Figure, list[Axes]]:
    rows = -(-count // columns)
    columns = min(columns, count)
    fig = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(rows, columns)).ravel())
    for spare in axes[count:]:
        spare.set_visible(False)
    for ax in axes[:count]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: one tick
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return fig, axes[:count]


def line(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, **style) -> None:
    """Markers too, so a one-epoch run still shows its point."""
    ax.plot(x, y, marker="o", markersize=3, label=label, **style)


def empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray", wrap=True)


def save(fig: Figure, path: Path) -> str:
    """Write the PNG; returns its bare file name for the page's relative link."""
    FigureCanvasAgg(fig).print_png(path)
    return path.name
