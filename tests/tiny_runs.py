"""A real ``kd3 distill`` small enough to run many times: KD³ (selection, teacher-view caches,
classifier sharing, MixDistribution) on 256 UCI digits, 3 epochs of 4 steps, from a LeNet-5-half
teacher trained for 2 epochs (~84 %: far enough above chance for the at-chance rule to judge).

``start_paused`` runs it as a ``python -m kd3.cli`` subprocess that stops at a named point
(``KD3_TEST_PAUSE``, see kd3.engine.signals), for a test to SIGKILL / SIGTERM it there.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

from kd3.cli import main
from kd3.data.pool import Pool
from kd3.data.sources import load_source
from kd3.engine.signals import PAUSE_ANNOUNCEMENT, PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


def write_inputs(root: Path) -> None:
    """``root/teacher.pt`` (trained, in this process) and ``root/pool.npz``."""
    assert main(["train-teacher", str(REPO / "configs/teachers/mnist5k-lenet5_bn.yaml"), "model=lenet5_half_bn",
                 "data=uci-digits:train", "val_data=uci-digits:test", "test_data=uci-digits:test",
                 f"output={root / 'teacher.pt'}", f"output_dir={root / 'teacher-runs'}", "train.epochs=2",
                 "progress=false"]) == 0
    Pool.unlabelled(load_source("uci-digits:train").images[:256], origin="folder").save(root / "pool.npz")


def distill_args(root: Path, out: Path, *overrides: str) -> list[str]:
    return ["distill", str(REPO / "configs/digits-wild/kd3.yaml"), f"teacher.checkpoint={root / 'teacher.pt'}",
            "teacher.recipe=", "pool.name=file", f"pool.path={root / 'pool.npz'}", "eval_data=uci-digits:test",
            f"train.epochs={EPOCHS}", "train.batch_size=32", "train.epoch_steps=4", "train.threads=1",
            "progress=false", f"output_dir={out}", *overrides]


def only_run(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def start_paused(args: list[str], point: str, cache: Path) -> subprocess.Popen:
    """``kd3 ARGS`` in a subprocess, returned once it announces it sleeps at ``point`` (POINT@EPOCH)."""
    env = {**os.environ, PAUSE_ENV: point, "OMP_NUM_THREADS": "1", "KD3_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "kd3.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(300, proc.kill)  # a run that never reaches the point must not hang the suite
    watchdog.start()
    seen = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(PAUSE_ANNOUNCEMENT):
                return proc
    finally:
        watchdog.cancel()
    proc.wait()
    raise AssertionError(f"the run never reached {point} (exit {proc.returncode}):\n{''.join(seen)[-3000:]}")


def signal_and_wait(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Send ``signum``; the exit code and the rest of stderr."""
    proc.send_signal(signum)
    assert proc.stderr is not None
    rest = proc.stderr.read()
    return proc.wait(timeout=120), rest


def kill(proc: subprocess.Popen) -> None:
    assert signal_and_wait(proc, signal.SIGKILL)[0] == -signal.SIGKILL


def checkpoint_state(run_dir: Path, name: str = "last.pt") -> dict:
    return torch.load(run_dir / name, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    """The two runs' ``last.pt`` hold bit-identical weights, optimizer state and KD³ selection."""
    first, second = checkpoint_state(a), checkpoint_state(b)
    assert first["epoch"] == second["epoch"] == EPOCHS
    assert first["method"].keys() == second["method"].keys()
    for key, value in first["method"].items():
        assert torch.equal(value, second["method"][key]), key
    for group_a, group_b in zip(first["optimizer"]["state"].values(), second["optimizer"]["state"].values()):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    sel_a, sel_b = first["method_state"]["selection"], second["method_state"]["selection"]
    assert torch.equal(sel_a["indices"], sel_b["indices"]) and sel_a["selected"] == sel_b["selected"]
