"""The run's teacher, from its checkpoint record: class names and accuracies for the report."""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd3.paths import expand
from kd3.report.page import Section, table
from kd3.teacher import TeacherInfo, read_teacher_info

# What reading a damaged or foreign file raises (a planted pickle is refused as a ValueError):
# the report then goes on without the record instead of failing.
_UNREADABLE = (ValueError, OSError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile)


@dataclass
class RunTeacher:
    """The teacher a run names in config.yaml, and its record when the file could be read."""

    path: Path | None  # teacher.checkpoint, expanded; None when the run names no teacher
    info: TeacherInfo | None  # None when there is no readable record; ``problem`` says why
    problem: str = ""

    def class_names(self, count: int) -> tuple[list[str], str]:
        """Names of classes 0..count-1 and, when the record cannot give them, the indices and a note why."""
        if self.info is not None and len(self.info.classes) == count:
            return list(self.info.classes), ""
        why = (self.problem if self.info is None else
               f"the teacher record names {len(self.info.classes)} classes but the run logged {count}")
        return [str(k) for k in range(count)], f"Classes are shown as indices because {why}."


def read_run_teacher(config: dict[str, Any]) -> RunTeacher:
    """The record of the teacher at the run's ``teacher.checkpoint`` (``{cache}`` and ``~`` expanded)."""
    teacher = config.get("teacher")
    if not isinstance(teacher, dict):  # a train-teacher run: it makes a teacher rather than using one
        return RunTeacher(None, None, "the run trains a teacher and distils from none")
    configured = str(teacher.get("checkpoint") or "")
    if not configured:
        return RunTeacher(None, None, "config.yaml names no teacher.checkpoint")
    path = expand(configured)
    if not path.is_file():
        return RunTeacher(path, None, f"the teacher checkpoint {path} (teacher.checkpoint in config.yaml) is gone")
    try:
        return RunTeacher(path, read_teacher_info(path))
    except _UNREADABLE as error:
        return RunTeacher(path, None, f"the teacher checkpoint {path} could not be read ({error})")


def accuracy(value: float) -> str:
    """A recorded accuracy as a percentage; "unknown" when NaN (e.g. a teacher brought with ``kd3 teacher import``)."""
    return f"{value:.2%}" if math.isfinite(value) else "unknown"


def teacher_accuracy_rows(teacher: RunTeacher) -> list[list[str]]:
    """The teacher's test and validation accuracy, for the table beside the student's."""
    if teacher.info is None:
        return [["teacher accuracy", f"unknown: {teacher.problem}"]]
    return [["teacher test accuracy (its checkpoint record)", accuracy(teacher.info.test_accuracy)],
            ["teacher validation accuracy (its checkpoint record)", accuracy(teacher.info.val_accuracy)]]


def teacher_section(teacher: RunTeacher) -> Section:
    title = "Teacher"
    info = teacher.info
    if info is None:
        return Section(title, note=f"No teacher record: {teacher.problem}.")
    rows = [["checkpoint", str(teacher.path)], ["architecture", info.arch], ["trained on", info.data],
            ["input (channels × size²)", f"{info.in_channels} × {info.image_size}²"],
            ["classes", f"{info.num_classes}: {', '.join(info.classes)}"],
            *teacher_accuracy_rows(teacher), ["weights sha256", info.sha256[:12] or "–"]]
    return Section(title, body=table(["quantity", "value"], rows))
