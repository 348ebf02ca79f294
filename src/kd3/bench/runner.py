"""Run every (group, row, seed) of a bench as a ``kd3 distill`` subprocess and cache its summary.

A run is finished when its JSON exists with the row's teacher and settings, and nothing finished is ever run
again, so resuming a bench is running the same command again; a record whose row has changed since (another
teacher, or settings that compute something else) is run again (``--tables-only`` warns of it). A run cut short
is continued from its last.pt (``kd3 distill --resume``) when it has one with the same settings, else started
afresh.
Subprocesses, not threads: ``--jobs N`` then trains N single-thread runs on N cores, which on a
small CPU is much faster than one run with N threads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from kd3.bench.records import all_records, read_context, read_json, same_teacher, write_context, write_json
from kd3.bench.spec import BenchSpec, Run
from kd3.bench.stats import binomial_se, mean_std
from kd3.config import ConfigError, DistillConfig, load_config, to_dict
from kd3.data.contamination import pool_contamination
from kd3.data.pool import Pool
from kd3.engine.logging import MetricsLog

SELECTION_KEYS = ("selected", "precision", "recall", "precision_correct", "recall_correct")

# (run, run directory to resume or None) -> the finished run directory. Tests inject fakes.
Launcher = Callable[[Run, Path | None], Path]


class RunFailed(RuntimeError):
    """A run that exited non-zero or left incomplete metrics; the bench carries on without it."""


def resolved_config(run: Run) -> DistillConfig:
    return load_config(DistillConfig, run.config, list(run.overrides))


NOT_COMPUTED = ("name", "output_dir", "progress")  # settings that do not change what a run computes


def config_digest(cfg: DistillConfig) -> str:
    """What a run computes. Its name, output folder and progress bars do not change the result, so
    e.g. the sweep point at the default fraction reuses the main table's runs instead of repeating them."""
    values = {k: v for k, v in to_dict(cfg).items() if k not in NOT_COMPUTED}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if prefix or key not in NOT_COMPUTED:
            flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


@lru_cache(maxsize=None)
def _defaults(method: str) -> dict[str, Any]:
    """Every setting's default, dotted, with the options of ``method`` (a config names only what it sets).
    Cached per method: a bench compares every one of its records; callers only read the dict."""
    import kd3.methods  # noqa: F401  (registers every method)
    from kd3.methods import METHODS

    options = METHODS[method].Options() if method in METHODS else None
    return _flat({**to_dict(DistillConfig()),
                  "method": dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}})


def changed_settings(record: dict[str, Any], cfg: DistillConfig) -> list[str]:
    """The settings (dotted keys) in which a cached record's run differs from what its row resolves to now.

    A setting named on one side only is compared with its default (a section key kd3's config gained after the
    record was written; a method option the row stopped or started naming), so only what changes the computation
    counts; name, output folder and progress bars never do."""
    now, then = _flat(to_dict(cfg)), _flat(record.get("config") or {})
    defaults = _defaults(cfg.method.get("name", ""))
    return sorted(key for key in set(now) | set(then)
                  if now.get(key, defaults.get(key)) != then.get(key, defaults.get(key)))


def stale_records(runs: list[Run]) -> list[str]:
    """``"<run>: <settings>"`` for each of these runs whose cached record ran with other settings than its row's now."""
    stale = []
    for run in runs:
        changed = changed_settings(read_json(run.record), resolved_config(run)) if run.record.is_file() else []
        if changed:
            stale.append(f"{run.label}: {', '.join(changed)}")
    return stale


def distill_command(run: Run, resume: Path | None) -> list[str]:
    base = [sys.executable, "-m", "kd3.cli", "distill"]
    return [*base, "--resume", str(resume)] if resume else [*base, run.config, *run.overrides]


def _run_dirs(folder: Path) -> list[Path]:
    """kd3 run directories under ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)


def resumable(run: Run, cfg: DistillConfig) -> Path | None:
    """The newest earlier attempt with a checkpoint and the same settings (an attempt made before
    the spec was edited must not be continued with its old settings)."""
    for run_dir in reversed(_run_dirs(run.output_dir)):
        saved = run_dir / "config.yaml"
        if (run_dir / "last.pt").is_file() and saved.is_file() and load_config(DistillConfig, saved) == cfg:
            return run_dir
    return None


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def launch_subprocess(run: Run, resume: Path | None) -> Path:
    """One ``kd3 distill`` in a child process, its output appended to <output_dir>/log.txt."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    before = set(_run_dirs(run.output_dir))
    command = distill_command(run, resume)
    log = run.output_dir / "log.txt"
    # One OpenMP/BLAS thread per child too, so N parallel jobs do not oversubscribe N cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env).returncode
    if code:
        raise RunFailed(f"exit code {code}; {log} ends with:\n{_tail(log)}")
    if resume is not None:
        return resume
    created = set(_run_dirs(run.output_dir)) - before
    if len(created) != 1:
        raise RunFailed(f"expected one new run directory in {run.output_dir}, found {len(created)}")
    return created.pop()


@lru_cache(maxsize=None)
def test_set_size(spec: str) -> int:
    from kd3.data.sources import load_source

    return len(load_source(spec).labels)


def _number(value: Any) -> float:
    return float(value) if value is not None else float("nan")  # float("nan") also reads logged "nan"


def _selection(history: list[dict[str, Any]]) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """Selection quality of the last epoch and its mean over epochs (None without provenance)."""
    chosen = [record["selection"] for record in history if "selection" in record]
    if not chosen:
        return None, None
    last = {k: _number(chosen[-1].get(k)) for k in SELECTION_KEYS}
    mean = {k: mean_std(_number(s.get(k)) for s in chosen)[0] for k in SELECTION_KEYS}
    return last, mean


def summarise(run: Run, cfg: DistillConfig, run_dir: Path, process_time: float, stamp: dict[str, Any]) -> dict[str, Any]:
    """The cached record of a finished run, read from its metrics.jsonl: the LAST epoch's test
    accuracy (never the best: that would select a model on the test split)."""
    history = MetricsLog(run_dir / "metrics.jsonl").read()
    if not history or history[-1]["epoch"] != cfg.train.epochs or "test_acc" not in history[-1]:
        raise RunFailed(f"{run_dir}: metrics stop before epoch {cfg.train.epochs}")
    accuracy = float(history[-1]["test_acc"])
    count = test_set_size(cfg.eval_data)
    images = sum(int(r["train_images"]) for r in history)
    last, mean = _selection(history)
    return {
        "bench": run.bench, "group": run.group, "row": run.row, "kind": run.kind, "seed": run.seed,
        "test_acc": accuracy, "test_acc_se": binomial_se(accuracy, count), "test_images": count,
        "epochs": cfg.train.epochs, "selection_last": last, "selection_mean": mean,
        "images_seen": images, "wall_time": float(history[-1]["elapsed"]),
        "train_images_per_s": images / max(sum(float(r["epoch_time"]) for r in history), 1e-9),
        "process_time": process_time, "run_dir": str(run_dir), "config_path": run.config,
        "overrides": list(run.overrides), "command": shlex.join(["kd3", "distill", run.config, *run.overrides]),
        "config": to_dict(cfg), "config_digest": config_digest(cfg), **stamp,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none), for the machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def run_stamp(command: str, results_dir: str = "results") -> dict[str, Any]:
    """What every record notes about where it came from: commit (+dirty when tracked files
    differ from it, the benches' own outputs under ``results_dir`` aside: an earlier bench of the
    same checkout rewrites those, not the code), the bench command, the machine."""
    import torch

    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){results_dir}"):
        commit += "+dirty"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"commit": commit, "bench_command": command,
            "machine": {"cores": os.cpu_count(), "cpu": cpu_model(), "gpu": gpu, "torch": torch.__version__}}


def prepare(spec: BenchSpec, runs: list[Run]) -> dict[str, Any]:
    """Check every run's settings, train (once) or load the teacher and build each group's pool
    before parallel runs could race to make them; record the teacher's accuracy and the pools'
    composition for the tables."""
    from kd3 import api
    from kd3.methods.base import get_method
    from kd3.paths import expand

    for run in runs:  # a typo in a spec should stop the bench now, not hours into it
        try:
            cfg = resolved_config(run)
            api.method_options(get_method(cfg.method.get("name", "")), cfg.method)
        except ConfigError as error:
            raise ConfigError(f"{run.label}: {error}") from None
    teacher_cfg = load_config(DistillConfig, spec.teacher_row.config, spec.teacher_row.overrides)
    _, info = api.prepare_teacher(teacher_cfg)
    test_data = info.recipe.get("test_data", "")
    context = read_context(spec.results_root)
    context["teacher"] = {
        "arch": info.arch, "data": info.data, "test_data": test_data, "test_accuracy": info.test_accuracy,
        "val_accuracy": info.val_accuracy, "test_images": test_set_size(test_data) if test_data else None,
        "sha256": info.sha256, "checkpoint": str(expand(teacher_cfg.teacher.checkpoint)),
    }
    pools, done = context.setdefault("pools", {}), set()
    for run in runs:
        if run.kind != "reference" and run.group not in done:  # rebuilt each call: the spec may have changed
            cfg = resolved_config(run)
            raw = replace(cfg, pool=replace(cfg.pool, oracle=False, drop_contaminated=False))
            pool = api.load_pool(raw)
            pools[run.group] = {"images": len(pool), "meta": pool.meta, "contamination": _contamination(pool, raw)}
            done.add(run.group)
    write_context(spec.results_root, context)
    return context


def _contamination(pool: Pool, cfg: DistillConfig) -> dict[str, Any] | None:
    """How many of the pool's images copy the test images its rows are scored on (cached per pool;
    counted before any ``pool.drop_contaminated``)."""
    if not cfg.eval_data:
        return None
    report = pool_contamination(pool, cfg.eval_data, duplicates=False, show_progress=cfg.progress)
    return report.summary()


@dataclass
class Outcome:
    cached: int = 0  # finished before this call
    ran: int = 0
    reused: int = 0  # same settings as another finished run: its record copied
    failed: list[str] = field(default_factory=list)


class Runner:
    def __init__(self, results_root: Path, stamp: dict[str, Any], launcher: Launcher = launch_subprocess,
                 say: Callable[[str], None] = print):
        self.results_root = results_root
        self.stamp = stamp
        self.launcher = launcher
        self.say = say
        self.lock = threading.Lock()
        # Per call of run(): progress counters and finished records by config digest.
        self.outcome, self.total, self.done, self.started = Outcome(), 0, 0, time.perf_counter()
        self.twins: dict[str, Path] = {}

    def run(self, runs: list[Run], jobs: int = 1) -> Outcome:
        """Bring every run to a cached record; ``jobs`` runs at a time."""
        teacher = self.stamp.get("teacher_sha256")
        pending: list[Run] = []
        other_teacher = other_settings = 0
        changed_keys: set[str] = set()
        for run in runs:
            record = read_json(run.record) if run.record.is_file() else None
            if record is not None and not same_teacher(record, teacher):
                other_teacher += 1
            elif record is not None and (changed := changed_settings(record, resolved_config(run))):
                other_settings += 1
                changed_keys.update(changed)
            elif record is not None:
                continue  # finished with this teacher and these settings
            pending.append(run)
        self.outcome = Outcome(cached=len(runs) - len(pending))
        self.total, self.done, self.started = len(pending), 0, time.perf_counter()
        self.twins = {record.get("config_digest"): path for path, record in all_records(self.results_root)
                      if same_teacher(record, teacher)}
        why = [f"{other_teacher} with another teacher"] if other_teacher else []
        why += [f"{other_settings} with other settings ({', '.join(sorted(changed_keys))})"] if other_settings else []
        self.say(f"{len(runs)} runs: {self.outcome.cached} cached, {len(pending)} to do, {jobs} at a time"
                 + (f" (cached {', '.join(why)}: run again)" if why else ""))
        if jobs <= 1:  # in order, in this thread: an interruption leaves exactly the finished ones
            for run in pending:
                self._one(run)
            return self.outcome
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(self._one, run) for run in pending]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return self.outcome

    def _elapsed(self) -> str:
        return time.strftime("%H:%M:%S", time.gmtime(time.perf_counter() - self.started))

    def _finished(self, run: Run, record: dict[str, Any], note: str, reused: bool = False) -> None:
        write_json(run.record, record)
        with self.lock:
            self.twins[record["config_digest"]] = run.record
            self.done += 1
            self.outcome.reused += reused
            self.outcome.ran += not reused
            self.say(f"[{self.done}/{self.total}] {run.label}: {100 * record['test_acc']:.2f}% {note} "
                     f"(elapsed {self._elapsed()})")

    def _one(self, run: Run) -> None:
        cfg = resolved_config(run)
        digest = config_digest(cfg)
        with self.lock:
            twin = self.twins.get(digest)
        if twin is not None and twin.is_file():
            record = {**read_json(twin), "group": run.group, "row": run.row, "kind": run.kind,
                      "reused_from": str(twin)}
            self._finished(run, record, f"(same settings as {twin})", reused=True)
            return
        resume = resumable(run, cfg)
        self.say(f"start {run.label}" + (f", resuming {resume}" if resume else "") + f" (elapsed {self._elapsed()})")
        started = time.perf_counter()
        try:
            run_dir = self.launcher(run, resume)
            record = summarise(run, cfg, run_dir, time.perf_counter() - started, self.stamp)
        except RunFailed as error:
            with self.lock:
                self.outcome.failed.append(f"{run.label}: {error}")
            self.say(f"FAILED {run.label}: {error}")
            return
        self._finished(run, record, f"in {record['process_time']:.0f} s")
