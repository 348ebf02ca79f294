"""Worker and launcher lifecycle (issue 24): ingest's decoding workers never inherit the CLI's signal
handlers, never hang and never outlive their parent; a SIGTERM stops ingest with kd3's one line and
exit 143, leaving nothing half-written. Crawl conveniences: missing shards skipped with a count
under --allow-missing, and a folder of tars answered with the brace pattern that names them.

Processes are found through /proc (psutil is not a dependency): a test starts each kd3 command in
its own session, so what is left of it afterwards is whatever still has that process group.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kd3 import cli
from kd3.cli import main
from kd3.data import ingest as ingest_module
from kd3.data.ingest import ingest
from kd3.data.pool import Pool
from kd3.data.synthetic import write_crawl
from kd3.engine import distributed
from kd3.engine.faults import Fault
from kd3.engine.signals import PAUSE_ANNOUNCEMENT, Interrupted, PeerLost, raising_on_signals
from tiny_runs import checkpoint_state, only_run, signal_and_wait, start_paused, write_inputs

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 120  # seconds one ingest may take before it counts as hung


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, process group) of a live process, None once it is gone (a zombie counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[2]))


def _processes() -> dict[int, tuple[int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _children(pid: int) -> list[int]:
    return [p for p, (parent, _) in _processes().items() if parent == pid]


def _new_children(before: set[int]) -> list[int]:
    """This process's children that were not there ``before`` (earlier tests may leave helpers of their own)."""
    return sorted(set(_children(os.getpid())) - before)


def _in_group(group: int) -> list[int]:
    return [p for p, (_, pgrp) in _processes().items() if pgrp == group]


def _kd3(*args: str) -> subprocess.Popen:
    """``kd3 ARGS`` in its own session, so that its process group is its PID."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kd3.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The processes of ``pids`` still alive after ``seconds`` (none, once they have all exited)."""
    deadline = time.monotonic() + seconds
    while (alive := [p for p in pids if _stat(p) is not None]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("crawl")
    pattern, _ = write_crawl(root, count=60, per_shard=10, size=24, folder=False)
    return root, pattern


@pytest.fixture(scope="module")
def big_crawl(tmp_path_factory):
    """Enough shards that two workers take seconds over them: time to signal an ingest in progress."""
    root = tmp_path_factory.mktemp("big")
    pattern, _ = write_crawl(root, count=3000, per_shard=50, size=64, folder=False)
    return root, pattern


def _ingest_args(pattern: str, out: Path) -> list[str]:
    return ["data", "ingest", pattern, "--size", "16", "--channels", "1", "--out", str(out), "--workers", "2"]


# -- ingest workers ------------------------------------------------------------------------------------
def test_ingest_with_two_workers_twenty_times_leaves_no_process_and_no_traceback(crawl, tmp_path, capfd):
    """The CLI's handlers are installed (main runs under raising_on_signals), as in the runs that hung."""
    _, pattern = crawl
    reference = ingest(pattern, 16, 1, workers=1)[0].digest()
    before = set(_children(os.getpid()))
    for run in range(20):
        out = tmp_path / f"pool-{run}"
        assert main(_ingest_args(pattern, out)) == 0
        assert _new_children(before) == [], f"run {run} left worker processes"
        assert Pool.load(out).digest() == reference
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Interrupted" not in captured.err
    assert captured.out.count("60 of 60 images loaded") == 20


@pytest.mark.slow
def test_ingest_cli_two_hundred_times_no_hang_traceback_or_leftover(crawl, tmp_path):
    _, pattern = crawl
    hangs, tracebacks, leftovers, failures = 0, 0, 0, 0
    for run in range(200):
        proc = _kd3(*_ingest_args(pattern, tmp_path / f"pool-{run}"))
        try:
            _, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            hangs += 1
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        tracebacks += "Traceback" in err
        failures += proc.returncode != 0
        leftovers += len(_gone_within(_in_group(proc.pid), 1.0))
    assert (hangs, tracebacks, leftovers, failures) == (0, 0, 0, 0)


def _wait_for_workers(proc: subprocess.Popen, count: int) -> list[int]:
    deadline = time.monotonic() + RUN_TIMEOUT
    while len(workers := _children(proc.pid)) < count:
        assert proc.poll() is None, f"ingest ended before its workers were seen: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no workers started"
        time.sleep(0.02)
    return workers


def test_sigterm_during_ingest_is_one_line_exit_143_and_nothing_written(big_crawl, tmp_path):
    _, pattern = big_crawl
    out = tmp_path / "pool"
    proc = _kd3(*_ingest_args(pattern, out))
    workers = _wait_for_workers(proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = [line for line in err.splitlines() if line.startswith("kd3 ")]
    assert lines == ["kd3 data: interrupted by SIGTERM"], err[-2000:]
    assert "Traceback" not in err
    assert _gone_within([*workers, *_in_group(proc.pid)], 5.0) == []
    assert not out.exists() or list(out.iterdir()) == []  # no partial images file, no temp file


def test_workers_die_with_a_killed_parent(big_crawl, tmp_path):
    _, pattern = big_crawl
    proc = _kd3(*_ingest_args(pattern, tmp_path / "pool"))
    workers = _wait_for_workers(proc, 2)
    proc.kill()
    proc.communicate()
    assert _gone_within(workers, 10.0) == []  # orphans would run on, reparented to init


def _die_on_third(task: int) -> tuple:
    if task == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
    return task, [], []


def test_a_killed_worker_is_one_error_not_a_hang():
    before = set(_children(os.getpid()))
    results = ingest_module._in_order(_die_on_third, list(range(8)), workers=2)
    assert [next(results)[0] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(Fault, match=r"decoding worker process \(PID \d+\) was killed by SIGKILL"):
        next(results)
    assert _new_children(before) == []


def _fails_on_second(task: int) -> tuple:
    if task == 1:
        raise ValueError(f"task {task} is bad")
    return task, [], []


def test_a_worker_error_is_raised_in_the_parent_and_the_workers_stop():
    before = set(_children(os.getpid()))
    with pytest.raises(ValueError, match="task 1 is bad"):
        list(ingest_module._in_order(_fails_on_second, list(range(6)), workers=2))
    assert _new_children(before) == []


# -- crawl conveniences --------------------------------------------------------------------------------
@pytest.fixture
def gappy(crawl, tmp_path):
    """The crawl's 6 shards with 00002 gone, and a pattern naming 10 (00000..00009): 5 missing."""
    _, pattern = crawl
    shards = tmp_path / "shards"
    shards.mkdir()
    for source in Path(pattern).parent.glob("*.tar"):
        if source.name != "00002.tar":
            (shards / source.name).symlink_to(source)
    return str(shards / "{00000..00009}.tar"), str(shards / "{00000,00001,00003,00004,00005}.tar")


def test_missing_shards_are_refused_with_their_count_and_the_flag(gappy, tmp_path, capsys):
    pattern, _ = gappy
    with pytest.raises(FileNotFoundError, match=r"5 of the 10 shards are missing \(.*00002\.tar, .*00006\.tar.*--allow-missing"):
        ingest(pattern, 16, 1, workers=1)
    assert main(["data", "ingest", pattern, "--size", "16", "--channels", "1", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "5 of the 10 shards are missing" in err and "--allow-missing" in err
    assert not (tmp_path / "p").exists()


def test_allow_missing_skips_absent_shards_and_counts_them(gappy, tmp_path, capsys):
    pattern, present = gappy
    pool, report = ingest(pattern, 16, 1, workers=2, allow_missing=True)
    expected, _ = ingest(present, 16, 1, workers=1)  # exactly the 5 shards that exist, in order
    assert report.missing_shards == 5 and len(pool) == 50 and pool.digest() == expected.digest()
    assert pool.meta["missing_shards"] == 5
    out = tmp_path / "pool"
    assert main([*_ingest_args(pattern, out), "--allow-missing"]) == 0
    printed = capsys.readouterr().out
    assert "50 of 50 images loaded" in printed and "5 missing shards skipped" in printed
    assert Pool.load(out).digest() == expected.digest()


def test_a_folder_of_shards_is_answered_with_the_pattern_that_names_them(crawl, tmp_path, capsys):
    _, pattern = crawl
    folder = Path(pattern).parent
    with pytest.raises(ValueError, match="holds .tar shards but no image files") as refused:
        ingest(folder, 16, 1, workers=1)
    suggested = str(refused.value).split("'")[1]
    assert suggested == str(folder / "{00000..00005}.tar")
    assert len(ingest(suggested, 16, 1, workers=1)[0]) == 60  # the suggestion works as given
    assert main(["data", "ingest", str(folder), "--size", "16", "--channels", "1", "--out", str(tmp_path / "p")]) == 2
    assert f"'{suggested}'" in capsys.readouterr().err
    named = tmp_path / "named"
    named.mkdir()
    for name in ("cats.tar", "dogs.tar"):
        (named / name).symlink_to(Path(pattern).parent / "00000.tar")
    with pytest.raises(ValueError, match=re.escape(f"'{named / '*.tar'}'")):
        ingest(named, 16, 1, workers=1)


# -- kd3 distill --nproc 2 -----------------------------------------------------------------------------
# Blind KD, a student without BatchNorm, no random augmentation: 2 processes reach the weights of 1 (see
# test_distributed), so a run cut by SIGTERM and resumed must end with an uninterrupted run's weights.
DETERMINISTIC = ["augment.padding=0", "augment.flip=false", "method.teacher_views=0", "progress=false",
                 "train.threads=1", "train.epochs=2", "train.batch_size=64", "train.epoch_steps=5", "eval_data=",
                 "student=lenet5_half"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_inputs(root)
    return root


def _distill_args(root: Path, out: Path) -> list[str]:
    return ["distill", "--nproc", "2", str(REPO / "configs/digits-wild/blind_kd.yaml"),
            f"teacher.checkpoint={root / 'teacher.pt'}", "teacher.recipe=", "pool.name=file",
            f"pool.path={root / 'pool.npz'}", *DETERMINISTIC, f"output_dir={out}"]


def _descendants(pid: int) -> list[int]:
    processes, found, frontier = _processes(), [], [pid]
    while frontier:
        children = [p for p, (parent, _) in processes.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _rank_pid(wrapper: int, rank: int) -> int:
    for pid in _descendants(wrapper):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} under {wrapper}")


def _student(run_dir: Path) -> dict:
    state = checkpoint_state(run_dir)["method"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The reference: the same run on 2 processes from start to end, through kd3's launcher."""
    out = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run([sys.executable, "-m", "kd3.cli", *_distill_args(tiny, out)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "KD3_CACHE": str(out / "cache")},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return only_run(out)


def test_sigterm_to_distill_nproc_2_leaves_no_process_one_resume_line_and_resumes_to_the_same_weights(
        tiny, uninterrupted, tmp_path):
    out = tmp_path / "cut"
    proc = start_paused(_distill_args(tiny, out), "mid-epoch@2", tmp_path / "cache")
    processes = [proc.pid, *_descendants(proc.pid)]  # the wrapper, torchrun, its 2 ranks
    assert len(processes) == 4
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "libtorch" not in maps  # the wrapper holds none of the run's memory
    started = time.monotonic()
    code, err = signal_and_wait(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert _gone_within(processes, max(0.0, 10 - (time.monotonic() - started))) == []
    run = only_run(out)
    said = [line for line in err.splitlines() if line.startswith("kd3 ") and not line.startswith(PAUSE_ANNOUNCEMENT)]
    assert said == [f"kd3 distill: interrupted by SIGTERM during epoch 2; {run / 'last.pt'} holds the last finished "
                    f"epoch (1); continue with: kd3 distill --resume {run}"], err[-3000:]
    assert "Traceback" not in err and "torch/distributed" not in err  # no torchrun log lines either
    assert main(["distill", "--resume", str(run)]) == 0
    first, second = _student(uninterrupted), _student(run)
    assert first.keys() == second.keys()
    for key in first:  # float rounding of a 2-way gradient sum, as in test_distributed
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_killed_rank_is_one_line_naming_it_with_the_resume_command(tiny, tmp_path):
    out = tmp_path / "killed"
    proc = start_paused(_distill_args(tiny, out), "mid-epoch@2", tmp_path / "cache")
    processes = [proc.pid, *_descendants(proc.pid)]
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGKILL
    assert _gone_within(processes, 10) == []
    run = only_run(out)
    said = [line for line in err.splitlines() if line.startswith("kd3 ") and not line.startswith(PAUSE_ANNOUNCEMENT)]
    assert said == [f"kd3 distill: rank 1 was killed by SIGKILL during epoch 2; {run}/last.pt holds the last finished "
                    f"epoch (1); continue with: kd3 distill --resume {run}"], err[-3000:]
    assert "Traceback" not in err and "torch/distributed" not in err  # no torchrun log lines either


def test_a_repeated_signal_does_not_cut_short_the_stop_the_first_one_started():
    cleaned = False
    with pytest.raises(Interrupted) as stopped:
        with raising_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # e.g. a second Ctrl-C, or torchrun's SIGTERM after kd3's
                time.sleep(0.05)  # where the handler runs
                cleaned = True
    assert stopped.value.signum == signal.SIGTERM and cleaned


def _rank_of_two(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for step in range(50):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            distributed.all_reduce_sum({"step": float(step)})
        except PeerLost as lost:
            results[rank] = (step, lost.exit_code, lost.describe())
            return


def test_a_peer_killed_mid_collective_is_peer_lost_on_the_survivor(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    ranks = [context.Process(target=_rank_of_two, args=(rank, str(tmp_path / "init"), results)) for rank in (0, 1)]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(120)
    assert [proc.exitcode for proc in ranks] == [0, -signal.SIGKILL]
    step, code, text = results[0]
    assert step == 2 and code == 1
    assert text.startswith("stopped because another process of the run did (") and "peer" in text
    assert "pair.cc" not in text and "GLHF" not in text  # gloo's first sentence, not its source line and advice


def _statuses(folder: Path, launcher: dict | None, **ranks: dict) -> Path:
    folder.mkdir()
    for name, status in ranks.items():
        (folder / f"{name.replace('_', '-')}.json").write_text(json.dumps(status))
    if launcher is not None:
        (folder / "launcher.json").write_text(json.dumps({"failures": launcher}))
    return folder


def test_the_launch_outcome_is_one_line_from_the_ranks_statuses_and_kd3s_exit_code(tmp_path, capsys):
    run = tmp_path / "run"
    stop = {"line": f"kd3 distill: interrupted by SIGINT during epoch 3; ...; continue with: kd3 distill --resume {run}",
            "run_dir": str(run), "epoch": 3, "saved_epoch": 2, "resumable": True, "exit_code": 130}
    lost = {**stop, "line": "kd3 distill: stopped because another process of the run did (...)", "exit_code": 1}
    # Ctrl-C forwarded: rank 0's line (not rank 1's, whose epoch may lag), 128 + SIGINT.
    folder = _statuses(tmp_path / "a", {"0": 130, "1": 130}, rank_0=stop, rank_1={**stop, "line": "rank 1"})
    assert cli._launch_outcome(1, [signal.SIGINT], folder) == 130
    assert capsys.readouterr().err.splitlines() == [stop["line"]]
    # Rank 1 crashed with a traceback of its own (exit 1); rank 0 lost its peer: the line names rank 1.
    folder = _statuses(tmp_path / "b", {"0": 1, "1": 1}, rank_0=lost)
    assert cli._launch_outcome(1, [], folder) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"kd3 distill: rank 1 exited with code 1 during epoch 3; {run}/last.pt holds the last finished epoch (2); "
        f"continue with: kd3 distill --resume {run}"]
    # A bad config on every rank: rank 0 printed it, no status, the launcher's code (2) stands.
    assert cli._launch_outcome(2, [], _statuses(tmp_path / "c", {"0": 2, "1": 2})) == 2
    assert capsys.readouterr().err == ""
