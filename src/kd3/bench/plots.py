"""Bench charts on matplotlib's Agg canvas (no pyplot: no global backend or figure state)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

COLOURS = {"method": "tab:blue", "reference": "tab:green", "oracle": "tab:orange", "teacher": "tab:gray"}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def bar_chart(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Horizontal bars of mean test accuracy (%) with ±std error bars, coloured by row kind."""
    shown = [r for r in rows if _finite(r["mean"])]
    fig = Figure(figsize=(7.5, 0.42 * len(shown) + 1.4), layout="constrained")
    ax = fig.subplots()
    y = range(len(shown))
    means = [100 * r["mean"] for r in shown]
    errors = [100 * r["std"] if _finite(r["std"]) else math.nan for r in shown]  # NaN: no bar (one value)
    ax.barh(y, means, xerr=errors, capsize=3, color=[COLOURS[r["kind"]] for r in shown])
    for i, mean in enumerate(means):
        ax.text(mean + (errors[i] if _finite(errors[i]) else 0.0) + 0.8, i, f"{mean:.1f}", va="center", fontsize=8)
    ax.set_yticks(list(y), [r["name"] for r in shown])
    ax.invert_yaxis()  # table order, top to bottom
    ax.set_xlim(0, 105)
    ax.set_xlabel("test accuracy % (last epoch; error bar: std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=k) for k, c in COLOURS.items() if any(r["kind"] == k for r in shown)]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    return _save(fig, path)


def sweep_plot(series: dict[str, list[tuple[float, float, float]]], title: str, path: Path) -> Path:
    """Accuracy vs irrelevant fraction: one line per row, points (fraction, mean, std) with ±std bars."""
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for name, points in series.items():
        points = [p for p in points if _finite(p[1])]
        if points:
            ax.errorbar([100 * p[0] for p in points], [100 * p[1] for p in points],
                        yerr=[100 * p[2] if _finite(p[2]) else 0.0 for p in points],
                        marker="o", markersize=4, capsize=3, label=name)
    ax.set_xlabel("irrelevant images in the pool (%)")
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
