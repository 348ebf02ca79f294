"""``kd3 export`` and ``kd3.export``: a finished run's student in the formats you deploy.

Every format keeps one contract (``kd3.engine.export.INPUT_FORMAT``): uint8 images N×C×H×W, RGB
(or grey for C = 1), values 0-255, at the teacher's image size, in; logits N×num_classes out; the
normalisation is inside the file, and kd3's metadata (mean, std, classes, in_channels, image_size,
input_format, kd3_version, teacher_sha256, method) travels with it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kd3.engine.export import FILES, example_input, ship, shipped_meta, trace
from kd3.engine.faults import raise_if_failed
from kd3.shipped import load_model_file

FORMATS = tuple(FILES)  # torchscript (student.ts), export (student.pt2, torch.export), onnx (student.onnx)


def export(run_dir: str | os.PathLike, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write a finished run's student in ``formats`` (any of ``"torchscript"``, ``"onnx"``, ``"export"``)
    into ``run_dir`` and return the paths: ``student.ts``, ``student.onnx``, ``student.pt2``.

    ``student.ts`` and ``student.pt2`` are written by ``kd3 distill`` at the end of the run;
    ``student.onnx`` is (re)written from ``student.ts``. A ``student.ts`` from an older kd3
    (normalisation outside, no ``input_format`` in its metadata) is rewritten to the uint8 contract,
    with ``teacher_sha256`` left empty (it did not record it). ONNX needs the onnx package. A format
    that cannot be delivered (no onnx package, no student.pt2) raises ``ValueError`` in one line; a
    run that has not finished or failed raises ``FileNotFoundError``."""
    run_dir = Path(run_dir)
    wanted = list(dict.fromkeys(formats))
    if not wanted or any(fmt not in FILES for fmt in wanted):
        raise ValueError(f"formats={list(formats)}: choose from {', '.join(FORMATS)}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory (give the run directory `kd3 distill` printed)")
    raise_if_failed(run_dir)  # a diverged run has a student.FAILED note instead
    scripted = run_dir / FILES["torchscript"]
    if not scripted.is_file():
        raise FileNotFoundError(f"{scripted} does not exist: the run has not finished "
                                f"(continue it with `kd3 distill --resume {run_dir}`)")
    shipped = load_model_file(scripted)  # a foreign or damaged student.ts: one line
    legacy = "input_format" not in shipped.meta
    source = shipped.runner
    meta = shipped.meta
    if legacy:  # one traced module (the old graph behind its normalisation) is the source of every format
        # A legacy student.ts recorded no teacher checksum: left empty rather than guessed.
        meta = shipped_meta(shipped.preprocessing, str(shipped.meta.get("method", "")), "")
        source = trace(source, example_input(meta))  # the ONNX exporter cannot trace into a loaded ScriptModule
    if "export" in wanted:
        _check_program(run_dir / FILES["export"])
    # student.ts is the source: rewritten only when it predates the contract.
    ship(source, meta, run_dir, [fmt for fmt in wanted if fmt == "onnx" or (fmt == "torchscript" and legacy)],
         strict=True)
    return [run_dir / FILES[fmt] for fmt in wanted]


def _check_program(path: Path) -> None:
    """student.pt2 is written by ``kd3 distill`` from the trained model, and only then: from a
    student.ts, torch.export could only produce a graph fixed at one batch size."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist: torch.export needs the trained model, which `kd3 distill` exports "
                         "at the end of a run (a run by an older kd3, or one whose note said torch.export cannot "
                         "convert its model, has none); ship student.ts or student.onnx instead")
    load_model_file(path)  # a damaged or foreign student.pt2: one line


def export_run(run_dir: Path, fmt: str) -> list[Path]:
    """``kd3 export RUN_DIR --format FMT``: FMT is one of ``FORMATS`` or ``all``."""
    return export(run_dir, FORMATS if fmt == "all" else (fmt,))
