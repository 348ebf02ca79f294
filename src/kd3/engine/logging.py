"""Per-epoch JSONL metrics (mirrored to TensorBoard on request) and the summary tables kd3 prints."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kd3.config import LOGGERS, ConfigError

# Columns for a table written to a file, a pipe or CI: there is no terminal width to fit, and rich's
# default of 80 folds every cell of a wide table.
FILE_WIDTH = 200


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


def summary_writer_class() -> type:
    """torch's TensorBoard ``SummaryWriter``; a one-line error naming the extra when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package, an optional extra
        raise ConfigError("train.logger=tensorboard needs the tensorboard package: "
                          "pip install 'kd3[tensorboard]'") from None
    return SummaryWriter


def _scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Every number of a record as a TensorBoard tag: nested dicts as ``selection/precision``,
    lists (per-class counts, thresholds) as ``name/0``, ``name/1``, ...; text is left out."""
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _scalars(value, f"{tag}/")
        elif isinstance(value, (list, tuple)):
            out += _scalars({str(i): v for i, v in enumerate(value)}, f"{tag}/")
        elif isinstance(value, (int, float)):  # bool included: 0/1 is what TensorBoard can plot
            out.append((tag, float(value)))
    return out


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl``; flushed at once so a crash loses nothing.

    With ``logger="tensorboard"`` every record is also written, number by number with the epoch as
    step, to ``<run dir>/tensorboard`` (``metrics.jsonl`` stays the record kd3 itself reads)."""

    def __init__(self, path: Path, logger: str = "jsonl"):
        if logger not in LOGGERS:
            raise ConfigError(f"train.logger={logger!r}; valid: {', '.join(LOGGERS)}")
        self.path = path
        # Resolved now so that a missing package stops the run before its first epoch, not after it.
        self._writer_class = summary_writer_class() if logger == "tensorboard" else None
        self._writer: Any = None
        self._purge_step: int | None = None

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop lines of epochs after the checkpoint (they will be re-run). A line that is
        no record (the last one torn by a kill mid-write) is moved to ``metrics.jsonl.damaged`` with
        one warning: the checkpoint, not this log, is what a resume continues from."""
        self._purge_step = epoch + 1  # TensorBoard drops its events of those epochs when it reopens
        if not self.path.exists():
            return
        records, damaged = self._parse()
        if damaged:
            aside = self.path.with_name(self.path.name + ".damaged")
            with aside.open("a") as handle:
                handle.write("".join(line + "\n" for _, line in damaged))
            numbers = ", ".join(str(number) for number, _ in damaged)
            print(f"kd3: warning: {self.path}: line {numbers} is not a whole JSON record (a write cut short?); "
                  f"moved to {aside}, resuming from the checkpoint", file=sys.stderr)
        kept = [line for record, line in records if record["epoch"] <= epoch]
        self.path.write_text("".join(line + "\n" for line in kept))

    def _parse(self) -> tuple[list[tuple[dict[str, Any], str]], list[tuple[int, str]]]:
        """(record, line) of every whole record, and (line number, line) of every line that is none."""
        records, damaged = [], []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                records.append((record, line))
            else:
                damaged.append((number, line))
        return records, damaged

    def write(self, record: dict[str, Any]) -> None:
        plain = _plain(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(plain) + "\n")
        if self._writer_class is not None:
            self._mirror(plain)

    def _mirror(self, record: dict[str, Any]) -> None:
        if self._writer is None:  # opened on the first record, after a resume has set the purge step
            self._writer = self._writer_class(log_dir=str(self.path.parent / "tensorboard"), purge_step=self._purge_step)
        step = int(record["epoch"])
        for tag, value in _scalars({k: v for k, v in record.items() if k != "epoch"}):
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # like the JSONL line: on disk before the next epoch starts

    def read(self) -> list[dict[str, Any]]:
        """Every whole record (a torn line is left out; ``truncate_after`` reports and moves it)."""
        if not self.path.exists():
            return []
        return [record for record, _ in self._parse()[0]]


_NUMBER = re.compile(r"[-+]?[\d.]+(e[-+]?\d+)?( ± [\d.]+)?|nan|")


def _looks_numeric(value: Any) -> bool:
    """Numbers (and "a ± b") are right-aligned; text columns stay left-aligned."""
    return isinstance(value, (int, float)) or bool(_NUMBER.fullmatch(str(value).strip()))


def table_console() -> Console:
    """The terminal's width on a terminal, ``FILE_WIDTH`` columns anywhere else."""
    console = Console()
    return console if console.is_terminal else Console(width=FILE_WIDTH)


def print_table(title: str, columns: list[str], rows: list[list[Any]], console: Console | None = None) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        numeric = i > 0 and all(_looks_numeric(row[i]) for row in rows)
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    (console or table_console()).print(table)
