"""What a run directory holds, read once for every report section."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kd3.report.teacher import RunTeacher, read_run_teacher
from kd3.teacher_eval import read_teacher_accuracy

_SELECTION_FILE = re.compile(r"epoch-(\d+)\.npy")


@dataclass
class RunData:
    run_dir: Path
    config_text: str  # config.yaml as written, shown verbatim
    config: dict[str, Any]  # the same, parsed; a plain mapping so teacher runs can be reported too
    history: list[dict[str, Any]]  # metrics.jsonl, one record per finished epoch
    selections: dict[int, Path]  # epoch (1-based) -> selections/epoch-NNNN.npy
    teacher: RunTeacher  # the record of the teacher config.yaml names (class names, accuracies)
    # The teacher's accuracy on this run's own eval data (teacher_eval.json), None for runs without eval data
    teacher_eval: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.run_dir.name))

    @property
    def method(self) -> str:
        method = self.config.get("method")
        return str(method.get("name", "")) if isinstance(method, dict) else ""

    @property
    def configured_epochs(self) -> int | None:
        train = self.config.get("train")
        return train.get("epochs") if isinstance(train, dict) else None


def read_run(run_dir: Path) -> RunData:
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist (is {run_dir} a kd3 run directory?)")
    history = _finished_records(metrics_path) if metrics_path.is_file() else []
    if not history:
        raise ValueError(f"{run_dir} has no finished epoch yet (metrics.jsonl is missing or empty); "
                         "report again after the first epoch")
    config_text = config_path.read_text()
    folder = run_dir / "selections"
    matches = ((_SELECTION_FILE.fullmatch(p.name), p) for p in folder.glob("epoch-*.npy")) if folder.is_dir() else ()
    selections = {int(m.group(1)): p for m, p in matches if m}
    config = yaml.safe_load(config_text) or {}
    return RunData(run_dir=run_dir, config_text=config_text, config=config, history=history,
                   selections=dict(sorted(selections.items())), teacher=read_run_teacher(config),
                   teacher_eval=read_teacher_accuracy(run_dir))


def _finished_records(path: Path) -> list[dict[str, Any]]:
    """The log's complete lines: a run being trained may be halfway through appending the last one."""
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def number(value: Any) -> float:
    """A logged value as a float: NaN when missing or not a number. The log writes non-finite
    floats as strings ("nan", "inf"), which float() reads back."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def lookup(record: dict[str, Any], key: str) -> Any:
    """``record['selection']['precision']`` for the key "selection.precision"; None when absent."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def series(history: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the epochs where ``key`` holds a finite number."""
    pairs = [(r["epoch"], number(lookup(r, key))) for r in history]
    kept = [(e, v) for e, v in pairs if math.isfinite(v)]
    return np.array([e for e, _ in kept], dtype=int), np.array([v for _, v in kept], dtype=float)
