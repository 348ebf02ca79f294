"""``kd3 bench NAME``: run a bench's rows × seeds (cached per run, resumable) and write its tables."""
from __future__ import annotations

import argparse
import shlex
import sys
from functools import partial


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


def _fractions(text: str) -> list[float]:
    try:
        return [float(value) for value in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sweep points must be comma-separated numbers, got {text!r}") from None


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--jobs must be a positive integer, got {text!r}")
    return int(text)


def _steps(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--steps must be a positive integer, got {text!r}")
    return int(text)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark's rows over seeds and write results/NAME.md",
                       description="Runs every (row, seed) of configs/bench/NAME.yaml as a `kd3 distill` process, "
                                   "caches each finished one under results/NAME/ (so rerunning the command resumes), "
                                   "and writes results/NAME.md, .json and charts.")
    p.add_argument("name", help="a bench (fashion-wild, digits-wild), a bench spec .yaml, or 'scale' "
                                "(10k / 100k / 1M-image pools: time, memory, 1 vs 2 processes)")
    p.add_argument("--methods", type=_names, help="comma-separated rows to run, e.g. blind_kd,kd3 (default: all; "
                                             "scale --presets: recommended,kd3)")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 0,1 (default: the spec's); the tables then cover these seeds")
    p.add_argument("--jobs", type=_jobs, default=1,
                   help="runs at once, each one process with one thread (at most the number of cores)")
    p.add_argument("--sweep", action="store_true", help="run the irrelevant-fraction sweep instead of the main table")
    p.add_argument("--sweep-points", type=_fractions, metavar="F[,F...]",
                   help="run only these points of the sweep, e.g. 0.9 (implies --sweep; the tables still cover every point)")
    p.add_argument("--hard", action="store_true", help="run the hard-style pool variant instead of the main table")
    p.add_argument("--tables-only", action="store_true", help="run nothing; rewrite the tables from cached runs")
    p.add_argument("--sizes", type=_seeds, help="scale: comma-separated pool sizes (default: 10000,100000,1000000)")
    p.add_argument("--work-dir", default=None, help="scale: where the synthetic pools go (default: the temp dir; "
                                                    "the 1M pool needs 3.1 GB), removed afterwards")
    p.add_argument("--out", default="results", help="scale: folder for scale.md, .json and .png")
    p.add_argument("--presets", action="store_true",
                   help="scale: run only the shipped presets (recommended, kd3; teacher_views: 8) on 1 and 2 processes, "
                        "and put their section into the existing scale.md")
    p.add_argument("--steps", type=_steps, default=None,
                   help="scale: training steps of the presets' one epoch (default 40; their whole-pool passes always run in full)")
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The invocation, rebuilt from the parsed options (recorded with every run)."""
    parts = ["kd3", "bench", args.name]
    if args.methods:
        parts += ["--methods", ",".join(args.methods)]
    if args.seeds is not None:
        parts += ["--seeds", ",".join(map(str, args.seeds))]
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    parts += [f"--{flag}" for flag in ("sweep", "hard") if getattr(args, flag)]
    if args.sweep_points:
        parts += ["--sweep-points", ",".join(f"{value:g}" for value in args.sweep_points)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> None:
    from kd3.bench import runner, tables
    from kd3.bench.spec import all_groups, groups, load_spec, plan_runs
    from kd3.engine.logging import print_table

    if args.name == "scale":
        from kd3.bench import scale

        scale.run(args)
        return

    spec = load_spec(args.name)
    failed: list[str] = []
    if not args.tables_only:
        runs = plan_runs(spec, groups(spec, sweep=args.sweep or bool(args.sweep_points), hard=args.hard,
                                         points=args.sweep_points), args.methods, args.seeds)
        stamp = runner.run_stamp(command_line(args), spec.results_dir)
        context = runner.prepare(spec, runs)
        # Each record names its teacher: runs cached with another teacher are run again, not tabled.
        stamp["teacher_sha256"] = context["teacher"]["sha256"]
        bench = runner.Runner(spec.results_root, stamp, say=partial(print, flush=True))
        outcome = bench.run(runs, jobs=args.jobs)
        print(f"{outcome.ran} run, {outcome.reused} reused, {outcome.cached} cached, {len(outcome.failed)} failed")
        failed = outcome.failed
    for table in tables.write_tables(spec, args.seeds):
        print_table(*tables.compact(table))
    print(f"wrote {spec.results_dir}/{spec.name}.md, .json and -bars.png")
    stale = runner.stale_records(plan_runs(spec, all_groups(spec), None, args.seeds))
    if stale:
        print(f"warning: {len(stale)} tabled record(s) ran with other settings than their rows have now, e.g. "
              f"{stale[0]}; run the bench (not --tables-only) to run them again", file=sys.stderr)
    if failed:
        print("failed runs (fix and rerun the same command; finished runs are kept):\n"
              + "\n".join(failed), file=sys.stderr)
        raise SystemExit(1)
