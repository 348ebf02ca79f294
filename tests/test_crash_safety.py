"""A run stopped at any point resumes to the weights of a run that was never stopped.

SIGKILL (nothing runs on the way out) at a named point of epoch 2 of 3 — after the first step, once
the KD³ selection pass has built the epoch's plan, while the new last.pt is a complete temp file —
loses only epoch 2: ``--resume`` re-runs it and ends bit-identical (weights, momentum, selection)
to an uninterrupted run. SIGINT / SIGTERM exit 130 / 143 with the resume command; a damaged last.pt
falls back to prev.pt, or says in one line that the run cannot be resumed.
"""
from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch

from kd3.cli import main
from kd3.engine import checkpoint, signals
from tiny_runs import REPO, assert_same_weights, checkpoint_state, distill_args, kill, only_run, signal_and_wait, start_paused, write_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    write_inputs(root)
    return root


@pytest.fixture(scope="module")
def straight(inputs):
    """The uninterrupted run every stopped one must end identical to (run in this process)."""
    assert main(distill_args(inputs, inputs / "straight")) == 0
    return only_run(inputs / "straight")


def _killed_then_resumed(inputs, straight, tmp_path, point: str) -> None:
    out = tmp_path / "runs"
    kill(start_paused(distill_args(inputs, out), point, tmp_path / "cache"))
    run_dir = only_run(out)
    assert checkpoint_state(run_dir)["epoch"] == 1  # epoch 2 never finished: at most it is lost
    if point.startswith("checkpoint-write"):  # killed mid-write: the new checkpoint is only a temp file
        assert len(list(run_dir.glob(".last.pt.*.tmp"))) == 1
    assert main(["distill", "--resume", str(run_dir)]) == 0
    assert_same_weights(straight, run_dir)
    assert (run_dir / "student.ts").is_file() and not list(run_dir.glob(".*.tmp"))


def test_sigkill_mid_epoch_then_resume_ends_identical(inputs, straight, tmp_path):
    _killed_then_resumed(inputs, straight, tmp_path, "mid-epoch@2")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["selection@2", "checkpoint-write@2", "mid-epoch@1"])
def test_sigkill_elsewhere_then_resume_ends_identical(inputs, straight, tmp_path, point):
    if point == "mid-epoch@1":  # nothing was saved: there is nothing to resume, and --resume says so
        out = tmp_path / "runs"
        kill(start_paused(distill_args(inputs, out), point, tmp_path / "cache"))
        assert main(["distill", "--resume", str(only_run(out))]) == 2
        return
    _killed_then_resumed(inputs, straight, tmp_path, point)


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_print_the_resume_command_and_keep_the_checkpoint(inputs, straight, tmp_path, signum):
    out = tmp_path / "runs"
    code, err = signal_and_wait(start_paused(distill_args(inputs, out), "mid-epoch@2", tmp_path / "cache"), signum)
    run_dir = only_run(out)
    assert code == 128 + signum  # 143 for SIGTERM, 130 for SIGINT, as a shell reports them
    name = signal.Signals(signum).name
    assert err.strip().splitlines() == [
        f"kd3 distill: interrupted by {name} during epoch 2; {run_dir}/last.pt holds the last finished epoch (1); "
        f"continue with: kd3 distill --resume {run_dir}"]
    assert checkpoint_state(run_dir)["epoch"] == 1 and not list(run_dir.glob(".*.tmp"))
    assert main(["distill", "--resume", str(run_dir)]) == 0
    assert_same_weights(straight, run_dir)


@pytest.mark.slow
def test_sigterm_while_the_needed_teacher_trains_says_there_is_nothing_to_resume(inputs, tmp_path):
    out = tmp_path / "runs"
    args = distill_args(inputs, out, "teacher.checkpoint={cache}/teachers/mnist5k-lenet5_bn.pt",  # the recipe's own entry
                        f"teacher.recipe={REPO / 'configs/teachers/mnist5k-lenet5_bn.yaml'}")
    code, err = signal_and_wait(start_paused(args, "mid-epoch@1", tmp_path / "cache"), signal.SIGTERM)  # the teacher's epoch
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith("digits-wild-kd3")]
    assert code == 143 and err.strip().splitlines()[-1] == (
        f"kd3 distill: interrupted by SIGTERM before training started: nothing to resume in {run_dir}, start the run again")
    assert not (tmp_path / "cache" / "teachers" / "mnist5k-lenet5_bn.pt").exists()


def test_damaged_last_pt_falls_back_to_prev_pt_and_still_ends_identical(straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "student.ts").unlink()
    assert checkpoint_state(run_dir, "prev.pt")["epoch"] == 2
    last = run_dir / "last.pt"
    os.truncate(last, last.stat().st_size // 2)
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kd3: {last} is damaged or truncated (")
    assert err[0].endswith(f"resuming from the checkpoint before it, {run_dir}/prev.pt (epoch 2)")
    assert (run_dir / "last.pt.damaged").is_file()  # kept for a look, out of prev.pt's way
    assert_same_weights(straight, run_dir)


def test_unreadable_checkpoints_are_one_line_and_exit_2(straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "last.pt").write_bytes(b"")
    os.truncate(run_dir / "prev.pt", 100)
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"kd3 distill: error: {run_dir}/last.pt is damaged or truncated (")
    assert f"and {run_dir}/prev.pt is damaged or truncated (" in err[0]
    assert err[0].endswith("this run cannot be resumed; start it again without --resume")


def test_atomic_save_keeps_the_replaced_file_as_previous(tmp_path):
    path, previous = tmp_path / "last.pt", tmp_path / "prev.pt"
    for value in range(3):
        checkpoint.atomic_save({"v": torch.tensor(value)}, path, keep_previous=previous)
    assert checkpoint.load(path)["v"] == 2 and checkpoint.load(previous)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]


def test_a_signal_during_a_deferred_block_is_raised_when_it_ends():
    finished = False
    with pytest.raises(signals.Interrupted) as stop:
        with signals.raising_on_signals():
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished = True  # the handler ran above, but held the signal back
    assert finished and stop.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
