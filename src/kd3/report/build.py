"""``write_report``: every section, in reading order, into RUN_DIR/report/report.html."""
from __future__ import annotations

from pathlib import Path

from kd3.report.curves import method_metrics_section, training_section
from kd3.report.grids import grids_section
from kd3.report.page import render_page
from kd3.report.run import read_run
from kd3.report.selection import per_class_section, selection_section
from kd3.report.summary import config_section, cost_section, epochs_section, headline
from kd3.report.teacher import teacher_section


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` and its PNGs into ``out`` (default ``run_dir/report``); returns the
    page's path. Sections that do not apply to the run (no selection, no provenance, no teacher record)
    say so in a note."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        cost_section(run),
        teacher_section(run.teacher),
        training_section(run.history, out),
        selection_section(run, out),
        per_class_section(run, out),
        grids_section(run, out),
        method_metrics_section(run.history, out),
        epochs_section(run.history),
        config_section(run),
    ]
    page = out / "report.html"
    page.write_text(render_page(f"kd3 run {run.name}", f"{run_dir} · {headline(run)}", sections))
    return page
