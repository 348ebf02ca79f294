"""The ``kd3`` command: thin subcommands that parse, load a config and call ``kd3.api``."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from kd3.config import ConfigError


def _print_result(title: str, rows: list[list], columns: list[str]) -> None:
    from kd3.engine.logging import print_table

    print_table(title, columns, rows)


def _relaunch_with_torchrun(nproc: int) -> None:
    """``kd3 distill --nproc N ...`` is ``torchrun --standalone --nproc_per_node N -m kd3 distill ...``."""
    import subprocess

    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # drop --nproc N / --nproc=N, keep everything else as typed
        if arg == "--nproc":
            del argv[i:i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "kd3", *argv]
    print("running:", " ".join(command), file=sys.stderr)
    code = subprocess.call(command)
    if code:
        raise SystemExit(code)


def cmd_distill(args: argparse.Namespace) -> None:
    from kd3 import api
    from kd3.config import DistillConfig, load_config
    from kd3.engine import distributed

    if args.nproc > 1 and not distributed.launched():
        _relaunch_with_torchrun(args.nproc)
        return
    try:
        if args.resume:
            result = api.distill(None, resume=Path(args.resume))  # type: ignore[arg-type]
        else:
            result = api.distill(load_config(DistillConfig, args.config, args.overrides))
    finally:
        distributed.shutdown()
    if not distributed.launched() or int(os.environ.get("RANK", "0")) == 0:  # one summary, from rank 0
        _print_result("kd3 distill", [[str(result.run_dir), f"{100 * result.accuracy:.2f} ± {100 * result.accuracy_se:.2f}",
                                       f"{result.wall_time:.1f}", result.images_seen, f"{result.images_per_second:.0f}"]],
                      ["run", "test acc % (±SE)", "wall s", "images seen", "images/s"])


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from kd3 import api
    from kd3.config import TeacherTrainConfig, load_config

    path, info = api.train_teacher(load_config(TeacherTrainConfig, args.config, args.overrides))
    _print_result("kd3 train-teacher", [[str(path), info.arch, f"{100 * info.val_accuracy:.2f}",
                                         f"{100 * info.test_accuracy:.2f}", info.sha256[:12]]],
                  ["checkpoint", "arch", "val acc %", "test acc %", "sha256"])


def cmd_eval(args: argparse.Namespace) -> None:
    from kd3 import api

    result = api.evaluate_file(Path(args.checkpoint), args.data, args.device)
    _print_result("kd3 eval", [[args.checkpoint, args.data, f"{100 * result.accuracy:.2f} ± {100 * result.standard_error:.2f}",
                                f"{result.loss:.4f}", result.count]],
                  ["model", "data", "accuracy % (±SE)", "loss", "images"])


def cmd_export(args: argparse.Namespace) -> None:
    from kd3.export_cli import export_run

    for path in export_run(Path(args.run_dir), args.format):
        print(f"wrote {path}")


def cmd_data(args: argparse.Namespace) -> None:
    from kd3 import data_cli

    data_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd3", description="Knowledge distillation from web images (KD³ and baselines)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="distil a student from a teacher on a web pool")
    p.add_argument("config", nargs="?", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 method.name=kd3")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    p.add_argument("--nproc", type=int, default=1,
                   help="train on N processes (torchrun on this machine: N GPUs, or N CPU processes with gloo)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("train-teacher", help="train a teacher on a labelled source")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("eval", help="test accuracy of a teacher checkpoint, exported student or run directory")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="SOURCE:SPLIT, e.g. fashion-mnist:test")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a run's deployable student (TorchScript, ONNX)")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["torchscript", "onnx", "all"], default="torchscript")
    p.set_defaults(func=cmd_export)

    from kd3.bench.cli import add_bench_parser
    from kd3.data_cli import add_data_parser
    from kd3.report.cli import add_report_parser

    add_data_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    p = sub.add_parser("demo", help="the README demo: KD³ and blind KD side by side on fashion-wild")
    p.add_argument("--config", default=None, help="demo config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=lambda a: __import__("kd3.demo", fromlist=["run"]).run(a.config, a.overrides))
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a bad config, a bad or missing file or a missing dataset raises: one line, exit code 2.
    Evaluated only once an error propagates, so the import does not slow every command down."""
    from kd3.data.sources import DataUnavailable

    return ConfigError, FileNotFoundError, ValueError, DataUnavailable


def _faults() -> type[BaseException]:
    """A diverged run (exit 3) or a failed write (exit 4): see kd3.engine.faults. Imported lazily."""
    from kd3.engine.faults import Fault

    return Fault


def _interrupted(command: str, stop: KeyboardInterrupt) -> int:
    """One line on SIGINT / SIGTERM: where the run stands and, for distill, the exact resume command."""
    from kd3.engine.signals import Interrupted

    interrupted = stop if isinstance(stop, Interrupted) else Interrupted()
    line = f"kd3 {command}: {interrupted.describe()}"
    if command == "distill" and interrupted.resumable:
        line += f"; continue with: kd3 distill --resume {shlex.quote(str(interrupted.run_dir))}"
    print(line, file=sys.stderr)
    return interrupted.exit_code


def main(argv: list[str] | None = None) -> int:
    from kd3.engine.signals import raising_on_signals

    args = build_parser().parse_args(argv)
    if args.command == "distill" and not args.config and not args.resume:
        print("kd3 distill: give a CONFIG or --resume RUN_DIR", file=sys.stderr)
        return 2
    try:
        with raising_on_signals():  # SIGTERM too stops with the message below, not silently
            args.func(args)
    except _user_errors() as error:
        print(f"kd3 {args.command}: error: {error}", file=sys.stderr)
        return 2
    except _faults() as error:
        print(f"kd3 {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code  # type: ignore[attr-defined]
    except KeyboardInterrupt as stop:
        return _interrupted(args.command, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
