"""The teacher's accuracy on a run's own eval data, ``RUN/teacher_eval.json``: measured once when the run
starts, so the student is compared with its teacher on the same images (an imported teacher has no
accuracy of its own). Read by the delivery's at-chance check, the distill summary and the report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd3.data.pool import atomic_write
from kd3.data.sources import LabelledData
from kd3.engine import faults
from kd3.engine.evaluate import evaluate
from kd3.methods.base import DistillContext

TEACHER_EVAL = "teacher_eval.json"


def record_teacher_accuracy(run_dir: Path, ctx: DistillContext, eval_data: LabelledData, name: str) -> None:
    """Measure the teacher of ``ctx`` on ``eval_data`` (named ``name``) and write the record."""
    result = evaluate(ctx.teacher, eval_data.images, eval_data.labels, ctx.normalize, ctx.device)
    record = {"eval_data": name, "accuracy": result.accuracy, "standard_error": result.standard_error,
              "images": result.count}
    with faults.writing(run_dir / TEACHER_EVAL, "nothing was trained"):
        atomic_write(run_dir / TEACHER_EVAL, lambda f: f.write(json.dumps(record, indent=1).encode()))


def read_teacher_accuracy(run_dir: Path) -> dict[str, Any] | None:
    """What ``record_teacher_accuracy`` wrote, or None (no eval data, or a run from an older kd3)."""
    try:
        return json.loads((run_dir / TEACHER_EVAL).read_text())
    except (OSError, ValueError):
        return None
