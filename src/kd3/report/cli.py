"""The ``kd3 report`` subcommand; ``kd3.cli`` registers it with ``add_report_parser``."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="an HTML report (curves, selections, image grids, teacher, cost) of a run directory")
    p.add_argument("run_dir", help="a run directory written by kd3 distill (holds config.yaml and metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from kd3.report.build import write_report  # matplotlib loads only when a report is made

    page = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {page}")
