"""What each epoch trained on: selected-set size, precision/recall against provenance, per-class counts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kd3.report.page import Picture, Section, table
from kd3.report.plotting import empty, line, panels, save
from kd3.report.run import RunData, number, series

_QUALITY = (("selection.precision", "precision"), ("selection.recall", "recall"),
            ("selection.precision_correct", "precision (relevant & teacher-correct)"),
            ("selection.recall_correct", "recall (relevant & teacher-correct)"))
# The size of an epoch's chosen set, first found first: the trainer's count (logged only with
# provenance), then the method's own (KD³: selected, DFND and the recommended recipe: dfnd_kept).
SIZE_KEYS = ("selection.selected", "selected", "dfnd_kept")
# Per-class counts of the chosen images, by method: KD³ logs selected_per_class, DFND its kept images.
PER_CLASS_KEYS = ("selected_per_class", "dfnd_kept_per_class")


def selection_sizes(run: RunData) -> tuple[np.ndarray, np.ndarray, str]:
    """(epochs, selected-set sizes, where they come from). A method that logs no count of its own is
    measured from its saved selections (the trainer saves one whenever an epoch trains on part of the pool)."""
    for key in SIZE_KEYS:
        epochs, sizes = series(run.history, key)
        if len(epochs):
            return epochs, sizes, f"metrics.jsonl key {key}"
    epochs = np.array(list(run.selections), dtype=int)
    sizes = np.array([len(np.load(path, mmap_mode="r")) for path in run.selections.values()], dtype=float)
    return epochs, sizes, "the saved selections/epoch-NNNN.npy"


def selection_section(run: RunData, out: Path) -> Section:
    epochs, sizes, origin = selection_sizes(run)
    title = "Selected set"
    if not len(epochs):
        return Section(title, note="No selection was logged: the method trained on the whole pool (or on "
                                   "generated or original data) every epoch.")
    history = run.history
    fig, (size_ax, quality_ax) = panels(2)
    line(size_ax, epochs, sizes, "selected images")
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
    caption = (f"Left: images selected per epoch (from {origin}). Right: precision and recall of that set "
               "against the pool's provenance (relevant images; relevant and correctly classified by the teacher).")
    return Section(title, [Picture(name, caption)], note=" ".join(notes))


def per_class_section(run: RunData, out: Path) -> Section:
    """Per predicted class and epoch, the images chosen: a heat map, and the last epoch as a table, by class name."""
    title = "Selected images per class"
    history = run.history
    key = next((k for k in PER_CLASS_KEYS if any(isinstance(r.get(k), list) for r in history)), None)
    if key is None:
        return Section(title, note="No per-class counts were logged; saved selections hold pool indices, not "
                                   "predicted classes, so they cannot give them.")
    classes = max(len(r[key]) for r in history if isinstance(r.get(key), list))
    names, note = run.teacher.class_names(classes)
    counts = np.full((classes, len(history)), np.nan)  # NaN: an epoch that logged no counts
    for column, record in enumerate(history):
        values = record.get(key)
        if isinstance(values, list):
            counts[:len(values), column] = [number(v) for v in values]
    epochs = [r["epoch"] for r in history]
    label_width = 0.07 * max(len(n) for n in names)  # inches the longest class name needs beside the map
    fig, (ax,) = panels(1, size=(max(5.0, 0.35 * len(epochs) + 2.5 + label_width), max(3.0, 0.3 * classes + 1.5)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(epochs[0] - 0.5, epochs[-1] + 0.5, classes - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label="images")
    ax.set(ylabel="predicted class", title=key, yticks=range(classes))
    ax.set_yticklabels(names, fontsize="small")
    ax.grid(False)
    if counts.size <= 300:  # numbers stay legible only on small maps
        for (row, column), value in np.ndenumerate(counts):
            if np.isfinite(value):
                ax.text(epochs[column], row, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white")
    name = save(fig, out / "per-class.png")
    caption = f"Images chosen per predicted class (rows) and epoch (columns), from {key}."
    return Section(title, [Picture(name, caption, _last_epoch_table(history, key, names))], note=note)


def _last_epoch_table(history: list[dict[str, Any]], key: str, names: list[str]) -> str:
    """The last epoch that logged ``key``, per class: chosen images (and, for KD³, the pool images predicted as it)."""
    record = next(r for r in reversed(history) if isinstance(r.get(key), list))
    columns = [(key, f"chosen at epoch {record['epoch']}")]
    if isinstance(record.get("predicted_per_class"), list):
        columns.insert(0, ("predicted_per_class", f"pool images predicted at epoch {record['epoch']}"))
    rows = [[class_name, *(_count(record[k], row) for k, _ in columns)] for row, class_name in enumerate(names)]
    return table(["class", *(label for _, label in columns)], rows)


def _count(values: list[Any], row: int) -> str:
    value = number(values[row]) if row < len(values) else float("nan")
    return f"{value:,.0f}" if np.isfinite(value) else "–"
