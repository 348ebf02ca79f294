"""Per-epoch curves: test accuracy, losses (total and each term), learning rate and method metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kd3.report.page import Picture, Section
from kd3.report.plotting import empty, line, panels, save
from kd3.report.run import series

# Keys shown elsewhere in the report (curves, cost, selection); every other scalar is a method metric.
_SHOWN_ELSEWHERE = {"epoch", "loss", "test_acc", "test_loss", "train_images", "epoch_time", "images_per_s",
                    "elapsed", "selected", "dfnd_kept"}


def _keys(history: list[dict[str, Any]]) -> list[str]:
    """Every key in first-seen order (a method may add a metric only from some epoch on)."""
    return list(dict.fromkeys(k for record in history for k in record))


def training_section(history: list[dict[str, Any]], out: Path) -> Section:
    fig, (acc_ax, loss_ax, terms_ax) = panels(3)
    epochs, acc = series(history, "test_acc")
    note = ""
    if len(epochs):
        line(acc_ax, epochs, 100 * acc, "test accuracy")
    else:
        empty(acc_ax, "no epoch was evaluated")
        note = "No epoch logged a test accuracy (the run has no eval data or has not reached an evaluation)."
    acc_ax.set(title="test accuracy (%)")
    for key, label in (("loss", "train loss (all terms)"), ("test_loss", "test loss")):
        x, y = series(history, key)
        if len(x):
            line(loss_ax, x, y, label)
    loss_ax.set(title="loss")
    loss_ax.legend(fontsize="small")
    for key in (k for k in _keys(history) if k.startswith("loss_")):
        line(terms_ax, *series(history, key), key.removeprefix("loss_"))
    terms_ax.set(title="train loss terms")
    if terms_ax.lines:
        terms_ax.legend(fontsize="small")
    else:
        empty(terms_ax, "no loss terms logged")
    name = save(fig, out / "training.png")
    return Section("Training curves", [Picture(name, "Test accuracy, train/test loss and each train loss term, per epoch.")],
                   note=note)


def method_metrics_section(history: list[dict[str, Any]], out: Path) -> Section:
    """Learning rate plus every other number the method logged (KD³: teacher_weight, mean_weight, ...)."""
    keys = [k for k in _keys(history) if k not in _SHOWN_ELSEWHERE and not k.startswith("loss_")
            and len(series(history, k)[0])]
    if not keys:
        return Section("Learning rate and method metrics", note="metrics.jsonl holds no further per-epoch numbers.")
    fig, axes = panels(len(keys), columns=4, size=(3.4, 2.6))
    for ax, key in zip(axes, keys):
        line(ax, *series(history, key), key)
        ax.set_title(key, fontsize="medium")
    name = save(fig, out / "method-metrics.png")
    return Section("Learning rate and method metrics",
                   [Picture(name, "Every other scalar in metrics.jsonl, one panel each: " + ", ".join(keys) + ".")])
