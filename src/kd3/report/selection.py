"""What each epoch trained on: selected-set size, precision/recall against provenance, per-class counts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kd3.report.page import Picture, Section
from kd3.report.plotting import empty, line, panels, save
from kd3.report.run import number, series

_QUALITY = (("selection.precision", "precision"), ("selection.recall", "recall"),
            ("selection.precision_correct", "precision (relevant & teacher-correct)"),
            ("selection.recall_correct", "recall (relevant & teacher-correct)"))
# Per-class counts of the chosen images, by method: KD³ logs selected_per_class, DFND its kept images.
PER_CLASS_KEYS = ("selected_per_class", "dfnd_kept_per_class")


def selection_section(history: list[dict[str, Any]], out: Path) -> Section:
    # The trainer's count (what the epoch trained on) needs provenance; without it the method's own count.
    size_key = next((k for k in ("selection.selected", "selected") if len(series(history, k)[0])), None)
    title = "Selected set"
    if size_key is None:
        return Section(title, note="No selection was logged: the method trained on the whole pool (or on "
                                   "generated or original data) every epoch.")
    fig, (size_ax, quality_ax) = panels(2)
    line(size_ax, *series(history, size_key), "selected images")
    size_ax.set(title="selected-set size", ylim=(0, None))
    for key, label in _QUALITY:
        x, y = series(history, key)
        if len(x):
            line(quality_ax, x, y, label)
    quality_ax.set(title="selection vs provenance", ylim=(-0.02, 1.02))
    notes = []
    if quality_ax.lines:
        quality_ax.legend(fontsize="small")
    else:
        empty(quality_ax, "pool has no provenance")
        notes.append("The pool has no provenance (an ingested folder), so precision and recall are unknown.")
    empty_epochs = [r["epoch"] for r in history if r.get("empty_selection") is True]
    if empty_epochs:
        notes.append(f"No image cleared its class threshold at epoch(s) {', '.join(map(str, empty_epochs))}; "
                     "those epochs trained on the whole pool.")
    name = save(fig, out / "selection.png")
    caption = (f"Left: images selected per epoch ({size_key}). Right: precision and recall of that set "
               "against the pool's provenance (relevant images; relevant and correctly classified by the teacher).")
    return Section(title, [Picture(name, caption)], note=" ".join(notes))


def per_class_section(history: list[dict[str, Any]], out: Path) -> Section:
    title = "Selected images per class"
    key = next((k for k in PER_CLASS_KEYS if any(isinstance(r.get(k), list) for r in history)), None)
    if key is None:
        return Section(title, note="No per-class counts were logged; saved selections hold pool indices, not "
                                   "predicted classes, so they cannot give them.")
    classes = max(len(r[key]) for r in history if isinstance(r.get(key), list))
    counts = np.full((classes, len(history)), np.nan)  # NaN: an epoch that logged no counts
    for column, record in enumerate(history):
        values = record.get(key)
        if isinstance(values, list):
            counts[:len(values), column] = [number(v) for v in values]
    epochs = [r["epoch"] for r in history]
    fig, (ax,) = panels(1, size=(max(5.0, 0.35 * len(epochs) + 2.5), max(3.0, 0.3 * classes + 1.5)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(epochs[0] - 0.5, epochs[-1] + 0.5, classes - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label="images")
    ax.set(ylabel="class", title=key, yticks=range(classes))
    ax.grid(False)
    if counts.size <= 300:  # numbers stay legible only on small maps
        for (row, column), value in np.ndenumerate(counts):
            if np.isfinite(value):
                ax.text(epochs[column], row, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white")
    name = save(fig, out / "per-class.png")
    return Section(title, [Picture(name, f"Images chosen per predicted class (rows) and epoch (columns), from {key}.")])
