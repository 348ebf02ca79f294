"""The run in numbers: cost and final accuracy, the per-epoch log as a table, the config."""
from __future__ import annotations

import math
from typing import Any

from kd3.report.page import Section, preformatted, table
from kd3.report.run import RunData, lookup, number
from kd3.report.teacher import accuracy as recorded_accuracy
from kd3.report.teacher import teacher_accuracy_rows

# (column, key in a metrics record, format); a column shows only when some epoch logged it.
_EPOCH_COLUMNS = (("epoch", "epoch", "{:.0f}"), ("lr", "lr", "{:.4g}"), ("train loss", "loss", "{:.4f}"),
                  ("test acc %", "test_acc", "{:.2%}"), ("test loss", "test_loss", "{:.4f}"),
                  ("selected", "selection.selected", "{:,.0f}"), ("selected (method)", "selected", "{:,.0f}"),
                  ("kept (DFND)", "dfnd_kept", "{:,.0f}"), ("precision", "selection.precision", "{:.3f}"),
                  ("recall", "selection.recall", "{:.3f}"), ("images", "train_images", "{:,.0f}"),
                  ("epoch s", "epoch_time", "{:.1f}"))


def final_accuracy(run: RunData) -> tuple[int, float]:
    """(last epoch, its test accuracy): the reported result is the last epoch's, never the best
    epoch's, because choosing an epoch by test accuracy would tune on the test set."""
    last = run.history[-1]
    return last["epoch"], number(last.get("test_acc"))


def headline(run: RunData) -> str:
    epoch, accuracy = final_accuracy(run)
    result = f"{accuracy:.2%}" if math.isfinite(accuracy) else "not evaluated"
    method = f"method {run.method} · " if run.method else ""  # teacher runs have no method
    teacher = run.teacher.info
    if run.teacher_eval is not None:
        beside = f" (the teacher on the same images: {recorded_accuracy(run.teacher_eval['accuracy'])})"
    elif teacher is not None:
        beside = f" (teacher test accuracy as recorded: {recorded_accuracy(teacher.test_accuracy)})"
    else:
        beside = ""
    return f"{method}{len(run.history)} epochs logged · test accuracy at the last epoch ({epoch}): {result}{beside}"


def cost_section(run: RunData) -> Section:
    epoch, accuracy = final_accuracy(run)
    history = run.history
    images = sum(number(r.get("train_images")) for r in history)
    train_seconds = sum(number(r.get("epoch_time")) for r in history)
    configured = run.configured_epochs
    unfinished = configured is not None and epoch < configured
    rows = [
        [f"test accuracy at the last epoch (epoch {epoch}; the last, not the best)",
         f"{accuracy:.2%}" if math.isfinite(accuracy) else "not evaluated at this epoch"],
        *([[f"teacher accuracy on the same eval data ({run.teacher_eval['eval_data']}, {run.teacher_eval['images']} images)",
            recorded_accuracy(run.teacher_eval["accuracy"])]] if run.teacher_eval is not None else []),
        *(teacher_accuracy_rows(run.teacher) if run.teacher.path is not None else []),
        ["test loss at the last epoch", _format(number(history[-1].get("test_loss")), "{:.4f}")],
        ["epochs logged", f"{len(history)}" + (f" of {configured}" if configured is not None else "")],
        ["wall time (training and evaluation)", _duration(number(history[-1].get("elapsed")))],
        ["images seen in training", _format(images, "{:,.0f}")],
        ["images per second (training steps only)", _format(images / train_seconds if train_seconds else math.nan,
                                                            "{:,.0f}")],
    ]
    note = f"The run is unfinished: {epoch} of {configured} epochs so far." if unfinished else ""
    return Section("Result and cost", body=table(["quantity", "value"], rows), note=note)


def epochs_section(history: list[dict[str, Any]]) -> Section:
    columns = [c for c in _EPOCH_COLUMNS if any(lookup(r, c[1]) is not None for r in history)]
    rows = [[_format(number(lookup(r, key)), fmt) for _, key, fmt in columns] for r in history]
    body = f"<details><summary>{len(rows)} epochs</summary>{table([c[0] for c in columns], rows)}</details>"
    return Section("Per-epoch log", body=body)


def config_section(run: RunData) -> Section:
    return Section("Config (config.yaml)", body=preformatted(run.config_text))


def _format(value: float, fmt: str) -> str:
    return fmt.format(value) if math.isfinite(value) else "–"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{seconds:,.1f} s ({hours}:{minutes:02d}:{rest:04.1f})"
