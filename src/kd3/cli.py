"""The ``kd3`` command: thin subcommands that parse, load a config and call ``kd3.api``."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from kd3.config import ConfigError, did_you_mean


def _print_result(title: str, rows: list[list], columns: list[str]) -> None:
    from kd3.engine.logging import print_table

    print_table(title, columns, rows)


# What runs torchrun for ``--nproc``: kd3.engine.distributed.launch, torchrun quietened (see there).
_LAUNCHER = "import sys; from kd3.engine.distributed import launch; sys.exit(launch(sys.argv[1:]))"
STOP_GRACE = 30.0  # seconds the ranks get, after a forwarded signal, to finish a checkpoint write and exit


def _launched() -> bool:
    """Whether this process is one rank of several (torchrun's WORLD_SIZE), read without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    return int(os.environ.get("RANK", "0")) if _launched() else 0


def _relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """``kd3 distill --nproc N ...``: ``torchrun --standalone --nproc_per_node N -m kd3 distill ...`` under a light
    parent (this process, which has imported neither torch nor the run's data), and its exit code.

    The launcher runs in its own session, and torchrun starts each rank in another: a SIGINT (Ctrl-C) or SIGTERM
    reaching this process is forwarded to the launcher, which stops its ranks with it; the ranks get
    ``STOP_GRACE`` seconds to finish a checkpoint write and exit before everything left is SIGKILLed. The ranks
    say nothing when they stop: each writes why to a status folder, and this process prints the one line once
    all have exited (``_launch_outcome``)."""
    import signal
    import subprocess
    import tempfile
    import time

    from kd3.engine.signals import LAUNCH_STATUS_ENV

    argv = list(argv)
    for i, arg in enumerate(argv):  # drop --nproc N / --nproc=N, keep everything else as typed
        if arg == "--nproc":
            del argv[i:i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    torchrun = ["--standalone", f"--nproc_per_node={nproc}", "-m", "kd3", *argv]
    print("running: torchrun", " ".join(map(shlex.quote, torchrun)), file=sys.stderr)
    forwarded: list[int] = []
    ranks: set[int] = set()
    launcher: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        del frame
        if launcher is not None and not forwarded:
            ranks.update(_children(launcher.pid))  # each in its own session: found now, killed later if need be
            _signal_group(launcher.pid, signum)
        forwarded.append(signum)

    with tempfile.TemporaryDirectory(prefix="kd3-launch-") as status:
        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *torchrun], start_new_session=True,
                                        env={**os.environ, LAUNCH_STATUS_ENV: status})
            if forwarded:  # a signal came while it was starting
                forward(forwarded.pop(), None)
            deadline = None
            while True:
                try:
                    code = launcher.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if forwarded and deadline is None:
                    deadline = time.monotonic() + STOP_GRACE
                if deadline is not None and time.monotonic() > deadline:
                    print(f"kd3 distill: the {nproc} processes had not stopped {STOP_GRACE:.0f} s after "
                          f"{signal.Signals(forwarded[0]).name}: killed", file=sys.stderr)
                    _signal_group(launcher.pid, signal.SIGKILL)
                    deadline = float("inf")
            for rank in ranks:  # normally gone with the launcher; a straggler must not train on unseen
                _signal_group(rank, signal.SIGKILL)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return _launch_outcome(code, forwarded, Path(status))


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc; none elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _signal_group(pid: int, signum: int) -> None:
    """``signum`` to the process group (session) ``pid`` leads, if any of it is left."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _launch_outcome(code: int, forwarded: list[int], status: Path) -> int:
    """The one line for how ``kd3 distill --nproc`` ended, and its exit code: a forwarded signal is rank 0's
    interruption line and 128 + the signal; a rank killed or crashed while the others were training is named,
    with where the run stands (from the ranks' status files) and the resume command; otherwise the ranks have
    said it themselves (rank 0 prints errors) and the launcher's code stands (2, 3, 4 as in one process)."""
    import json
    import signal

    from kd3.engine.signals import LAUNCHER_STATUS

    stops = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in status.glob("rank-*.json")}
    failures = {int(r): c for r, c in json.loads((status / LAUNCHER_STATUS).read_text())["failures"].items()} \
        if (status / LAUNCHER_STATUS).is_file() else {}
    where = stops.get(0) or (stops[min(stops)] if stops else None)
    if forwarded:
        name = signal.Signals(forwarded[0]).name
        print(where["line"] if where else f"kd3 distill: interrupted by {name}", file=sys.stderr)
        return 128 + forwarded[0]
    lost = {rank: c for rank, c in failures.items() if rank not in stops}  # stopped without saying why: killed, crashed
    if where is None:
        return code
    if not lost:  # a rank was signalled from outside (or torchrun was): its own line
        print(where["line"], file=sys.stderr)
        return where["exit_code"]
    rank, how = min(lost.items())
    said = f"was killed by {signal.Signals(-how).name}" if how < 0 else f"exited with code {how}"
    line = f"kd3 distill: rank {rank} {said}"
    if where["epoch"] is not None:
        line += f" during epoch {where['epoch']}"
    if where["resumable"]:
        held = f"{where['run_dir']}/last.pt holds the last finished epoch ({where['saved_epoch']}); " if 0 in stops else ""
        line += f"; {held}continue with: kd3 distill --resume {shlex.quote(where['run_dir'])}"
    elif where["run_dir"]:
        line += f"; nothing to resume in {where['run_dir']}, start the run again"
    print(line, file=sys.stderr)
    return 128 - how if how < 0 else how


def cmd_distill(args: argparse.Namespace) -> None:
    from kd3 import api
    from kd3.config import DistillConfig, load_config
    from kd3.engine import distributed
    from kd3.teacher_eval import read_teacher_accuracy

    try:
        if args.resume:
            # The first key=value lands in the CONFIG slot: with --resume the run's own config.yaml is the config.
            if args.config and "=" not in args.config:
                raise ConfigError(f"--resume {args.resume} continues with the run's own config.yaml; drop {args.config} "
                                  "(key=value overrides of train.epochs, train.eval_every, ... may follow)")
            overrides = [args.config, *args.overrides] if args.config else args.overrides
            result = api.distill(None, overrides, resume=Path(args.resume), allow_changed_inputs=args.allow_changed_inputs)
        elif args.allow_changed_inputs:
            raise ConfigError("--allow-changed-inputs applies to --resume RUN_DIR only")
        else:
            result = api.distill(load_config(DistillConfig, args.config, args.overrides))
    finally:
        distributed.shutdown()
    if not distributed.launched() or int(os.environ.get("RANK", "0")) == 0:  # one summary, from rank 0
        teacher = read_teacher_accuracy(result.run_dir)  # the teacher on the same eval images
        _print_result("kd3 distill", [[str(result.run_dir), f"{100 * result.accuracy:.2f} ± {100 * result.accuracy_se:.2f}",
                                       f"{100 * teacher['accuracy']:.2f}" if teacher else "–",
                                       f"{result.wall_time:.1f}", result.images_seen, f"{result.images_per_second:.0f}"]],
                      ["run", "test acc % (±SE)", "teacher acc %", "wall s", "images seen", "images/s"])


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
        print(f"exported {path}")


def _config_command(values: dict) -> str:
    """The command a config is for, told by its top-level keys (a YAML file says it nowhere else)."""
    from dataclasses import fields

    from kd3.config import DistillConfig, TeacherTrainConfig

    if "rows" in values:
        return "bench"
    if "runs" in values:
        return "demo"
    teacher_only = {f.name for f in fields(TeacherTrainConfig)} - {f.name for f in fields(DistillConfig)}
    return "train-teacher" if teacher_only & set(values) else "distill"


def cmd_config_show(args: argparse.Namespace) -> None:
    from kd3.config import DistillConfig, TeacherTrainConfig, dump_config, load_config, read_yaml

    command = args.kind or _config_command(read_yaml(Path(args.config)))
    if command not in ("distill", "train-teacher"):
        raise ConfigError(f"{args.config} is a {command} spec, not a distill or train-teacher config")
    cls = TeacherTrainConfig if command == "train-teacher" else DistillConfig
    print(dump_config(load_config(cls, args.config, args.overrides)), end="")


def cmd_config_list(args: argparse.Namespace) -> None:
    from kd3.config import PRESETS_DIR, preset_description, preset_names, read_yaml

    names = preset_names()
    rows = [(name, _config_command(read_yaml(PRESETS_DIR / f"{name}.yaml")), preset_description(name)) for name in names]
    width = max(len(name) for name in names)
    print(f"{'preset':<{width}}  {'command':<13}  description")
    for name, command, text in rows:
        print(f"{name:<{width}}  {command:<13}  {text}")
    print(f"\n{len(rows)} presets in {PRESETS_DIR}; use a name wherever a config path goes, e.g. kd3 config show recommended")


def cmd_data(args: argparse.Namespace) -> None:
    from kd3 import data_cli

    data_cli.run(args)


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a misspelt choice (Python < 3.14 has no suggest_on_error) and, where
    ``intermixed``, options and positionals in any order (``kd3 distill CFG --nproc 2 key=value``)."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._mixing = False

    def parse_known_args(self, args: list[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        # Sub-parsers are run through parse_known_args; parse_known_intermixed_args calls it back (Python 3.11),
        # so the flag sends that inner call to the plain parse.
        if not self.intermixed or self._mixing:
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False

    def _check_value(self, action: argparse.Action, value: object) -> None:
        choices = action.choices
        if choices is not None and value not in choices and isinstance(value, str) and all(isinstance(c, str) for c in choices):
            listed = ", ".join(map(repr, choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{did_you_mean(value, list(choices), quote=True)}; "
                                                 f"choose from {listed}")
        super()._check_value(action, value)


class _Version(argparse.Action):
    """``kd3 --version``: kd3's, torch's and torchvision's versions, read from package metadata (no torch import)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(version_text())  # stdout, as argparse's own version action does
        parser.exit()


def version_text() -> str:
    """``kd3 X (torch Y, torchvision Z, Python W)``."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import kd3

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"kd3 {kd3.__version__} (torch {installed('torch')}, torchvision {installed('torchvision')}, "
            f"Python {platform.python_version()})")


IMPORT_HELP = "import MODULE first, e.g. one whose @register_model adds your architecture (repeatable)"


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command (``kd3 distill``, ``kd3 data build``, ...), not those choosing one."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [parser]
    children = {id(p): p for group in groups for p in group.choices.values()}.values()  # aliases map to one parser
    return [leaf for child in children for leaf in _leaf_parsers(child)]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kd3", description="Knowledge distillation from web images (KD³ and baselines)")
    parser.add_argument("--version", action=_Version, help="print kd3's, torch's and torchvision's versions and exit")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (kd3 COMMAND -h for more)")
    config_help = "a YAML config file or a preset name, e.g. fashion-wild/recommended (kd3 config list)"
    overrides_help = "key=value overrides, before or after options, e.g. train.epochs=5 method.name=kd3"

    p = sub.add_parser("distill", help="distil a student from a teacher on a web pool", intermixed=True)
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("overrides", nargs="*", default=[], help=overrides_help)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt; key=value may "
                   "change train.epochs (more epochs continue a finished run), train.eval_every, train.threads, "
                   "train.device, progress")
    p.add_argument("--allow-changed-inputs", action="store_true",
                   help="with --resume: continue although the teacher, pool or eval data changed since the run started")
    p.add_argument("--nproc", type=int, default=1,
                   help="train on N processes (torchrun on this machine: N GPUs, or N CPU processes with gloo)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("train-teacher", help="train a teacher on a labelled source", intermixed=True)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", default=[], help=overrides_help)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("config", help="show a resolved config or list the packaged presets")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND", help="show or list")
    p = config_sub.add_parser("show", help="print the fully resolved config as YAML (what a run saves)", intermixed=True)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", default=[], help=overrides_help)
    p.add_argument("--as", dest="kind", choices=["distill", "train-teacher"], default=None,
                   help="the command the config is for (default: told by its keys)")
    p.set_defaults(func=cmd_config_show)
    p = config_sub.add_parser("list", help="the presets shipped with kd3: name, command and what each is")
    p.set_defaults(func=cmd_config_list)

    p = sub.add_parser("eval", help="test accuracy of any model file kd3 writes: a teacher .pt, a student "
                                    ".ts/.pt2/.onnx or a run directory")
    p.add_argument("checkpoint", metavar="MODEL", help="teacher .pt, student .ts / .pt2 / .onnx, or a finished run directory")
    p.add_argument("--data", required=True, help="SOURCE:SPLIT (e.g. fashion-mnist:test), a class-folder directory, "
                                                  "a path,label .csv or an .npz")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (ONNX always runs on the CPU)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="a run's student as TorchScript, ONNX or torch.export; every file takes uint8 "
                                      "N×C×H×W images (0-255, RGB or grey) and normalises inside")
    p.add_argument("run_dir", help="a finished run directory (holding student.ts)")
    p.add_argument("--format", choices=["torchscript", "onnx", "export", "all"], default="torchscript",
                   help="torchscript: student.ts; onnx: student.onnx; export: student.pt2 (torch.export); all: the three")
    p.set_defaults(func=cmd_export)

    from kd3.bench.cli import add_bench_parser
    from kd3.data_cli import add_data_parser
    from kd3.report.cli import add_report_parser
    from kd3.teacher_cli import add_teacher_parser

    add_data_parser(sub)
    add_bench_parser(sub)
    add_report_parser(sub)
    add_teacher_parser(sub)
    p = sub.add_parser("demo", help="the README demo: KD³ and blind KD side by side on fashion-wild", intermixed=True)
    p.add_argument("--config", default=None, help="demo config file or preset (default: the packaged demo preset)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides for every demo run, e.g. train.epochs=2")
    p.set_defaults(func=lambda a: __import__("kd3.demo", fromlist=["run"]).run(a.config, a.overrides))
    for leaf in _leaf_parsers(parser):  # --import after the command too: `kd3 distill CFG --import mynets`
        leaf.add_argument("--import", dest="imports_after", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
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
    from kd3.engine.signals import LAUNCH_STATUS_ENV, Interrupted

    interrupted = stop if isinstance(stop, Interrupted) else Interrupted()
    line = f"kd3 {command}: {interrupted.describe()}"
    if command == "distill" and interrupted.resumable:
        line += f"; continue with: kd3 distill --resume {shlex.quote(str(interrupted.run_dir))}"
    status = os.environ.get(LAUNCH_STATUS_ENV)
    if _launched() and status:  # under kd3's launcher, which prints one line for all ranks (_launch_outcome)
        import json

        run_dir = None if interrupted.run_dir is None else str(interrupted.run_dir)
        (Path(status) / f"rank-{_rank()}.json").write_text(json.dumps({
            "line": line, "run_dir": run_dir, "epoch": interrupted.epoch, "saved_epoch": interrupted.saved_epoch,
            "resumable": interrupted.resumable, "exit_code": interrupted.exit_code}))
    elif _rank() == 0:  # under a torchrun of the user's own: rank 0 speaks for all (the others' epoch may lag)
        print(line, file=sys.stderr)
    return interrupted.exit_code


def _load_plugins(modules: list[str]) -> None:
    """The ``--import`` modules and, always, the installed ``kd3.models`` entry points; a module that fails to
    import is a user error (one line, exit 2), not a traceback."""
    from kd3.models.plugins import load_plugins

    try:
        load_plugins(modules)
    except ImportError as error:
        where = f"--import {', '.join(modules)}" if modules else "a kd3.models entry point"
        raise ValueError(f"{where}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    import signal

    from kd3.engine.signals import die_with_parent, raising_on_signals

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--nproc N` relaunches under torchrun
    if args.command == "distill" and not args.config and not args.resume:
        print("kd3 distill: give a CONFIG or --resume RUN_DIR", file=sys.stderr)
        return 2
    if args.command == "distill" and args.nproc > 1 and not _launched():
        return _relaunch_with_torchrun(args.nproc, args.argv)  # before plugins and torch are imported: a light parent
    if _launched():
        die_with_parent(signal.SIGTERM, os.getppid())  # torchrun gone (killed): stop with the resume line, not train on
    try:
        with raising_on_signals():  # SIGTERM too stops with the message below, not silently
            _load_plugins([*args.imports, *args.imports_after])
            args.func(args)
    except _user_errors() as error:
        if _rank() == 0:  # every rank meets the same bad input: rank 0 says it
            print(f"kd3 {args.command}: error: {error}", file=sys.stderr)
        return 2
    except _faults() as error:
        if _rank() == 0:
            print(f"kd3 {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code  # type: ignore[attr-defined]
    except KeyboardInterrupt as stop:
        return _interrupted(args.command, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
