"""``kd3 teacher ...``: bring your own trained classifier as a kd3 teacher checkpoint."""
from __future__ import annotations

import argparse


def add_teacher_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``kd3 teacher`` and its subcommands."""
