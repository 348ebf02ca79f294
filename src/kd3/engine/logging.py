"""Per-epoch JSONL metrics and the summary table printed at the end of a run."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl``; flushed at once so a crash loses nothing."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop lines of epochs after the checkpoint (they will be re-run)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epoch]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(_plain(record)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


_NUMBER = re.compile(r"[-+]?[\d.]+(e[-+]?\d+)?( ± [\d.]+)?|nan|")


def _looks_numeric(value: Any) -> bool:
    """Numbers (and "a ± b") are right-aligned; text columns stay left-aligned."""
    return isinstance(value, (int, float)) or bool(_NUMBER.fullmatch(str(value).strip()))


def print_table(title: str, columns: list[str], rows: list[list[Any]], console: Console | None = None) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        numeric = i > 0 and all(_looks_numeric(row[i]) for row in rows)
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    (console or Console()).print(table)
