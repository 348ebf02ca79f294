"""The cached per-run JSONs and the bench context (teacher record, pool compositions) on disk."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

CONTEXT = "context.json"


def _strict(value: Any) -> Any:
    """NaN/inf become null, so the files stay valid JSON for any reader (not only Python's)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Write atomically: a half-written record must never count as a finished run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_strict(value), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def same_teacher(record: dict[str, Any], teacher_sha256: str | None) -> bool:
    """Whether a run was distilled from this teacher (None: any teacher). A record from before
    runs carried their teacher's checksum counts as another teacher's."""
    return teacher_sha256 is None or record.get("teacher_sha256") == teacher_sha256


def load_group(results_root: Path, group: str, teacher_sha256: str | None = None) -> dict[str, dict[int, dict[str, Any]]]:
    """``{row: {seed: record}}`` for every cached run of one group (with ``teacher_sha256``: only
    runs of that teacher, so a table never mixes students of two teachers)."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((results_root / group).glob("*/seed*.json")):
        record = read_json(path)
        if same_teacher(record, teacher_sha256):
            found.setdefault(record["row"], {})[record["seed"]] = record
    return found


def all_records(results_root: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, read_json(path)) for path in sorted(results_root.rglob("seed*.json"))]


def read_context(results_root: Path) -> dict[str, Any]:
    path = results_root / CONTEXT
    return read_json(path) if path.is_file() else {}


def write_context(results_root: Path, context: dict[str, Any]) -> None:
    write_json(results_root / CONTEXT, context)
