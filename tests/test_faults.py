"""Faults that are not the config's: a diverged training (exit 3) and a failed write (exit 4), each
one line on stderr that says what was kept, through the real ``kd3 distill`` of tiny_runs."""
from __future__ import annotations

import errno
import itertools
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from helpers import TinyNet, blobs
from kd3.cli import main
from kd3.data import pools
from kd3.data.augment import Normalizer
from kd3.data.pool import Pool
from kd3.engine import faults
from kd3.methods.kd3.method import KD3
from kd3.scores import cache as score_cache
from tiny_runs import REPO, checkpoint_state, distill_args, only_run, write_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_inputs(root)
    return root


def _stderr(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def tmpfs(directory: Path, options: str) -> Iterator[Path]:
    """A small real file system (root only); the test is skipped where mounting is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


# --- numerical faults ----------------------------------------------------------------------------

def test_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(inputs, tmp_path, monkeypatch, capsys):
    step, calls = KD3.training_step, itertools.count(1)

    def poisoned(self, batch):
        losses = step(self, batch)
        if next(calls) == 4 + 3:  # epoch 2 (4 steps an epoch), its step 3
            losses["wfa"] = losses["wfa"] * float("nan")
        return losses

    monkeypatch.setattr(KD3, "training_step", poisoned)
    out = tmp_path / "runs"
    assert main(distill_args(inputs, out)) == faults.EXIT_TRAINING_FAILED == 3
    run_dir = only_run(out)
    assert _stderr(capsys) == [
        f"kd3 distill: error: training diverged at epoch 2, step 3: loss term 'wfa' is nan; the last good checkpoint "
        f"(epoch 1) is kept in {run_dir}/last.pt; lower train.lr (now 0.05) or check the teacher checkpoint"]
    state = checkpoint_state(run_dir)
    assert state["epoch"] == 1 and faults.all_finite(state["method"].values())
    assert _epochs_logged(run_dir) == [1] and not (run_dir / "student.ts").exists()
    assert "training diverged at epoch 2, step 3" in (run_dir / faults.FAILED_NOTE).read_text()


def test_weights_that_become_infinite_stop_the_run_at_that_step(inputs, tmp_path, monkeypatch, capsys):
    step, calls = torch.optim.SGD.step, itertools.count(1)

    def overflowing(self, *args, **kwargs):
        step(self, *args, **kwargs)
        if next(calls) == 4 + 2:  # epoch 2, step 2: a weight overflows, the loss that led there was finite
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")

    monkeypatch.setattr(torch.optim.SGD, "step", overflowing)
    out = tmp_path / "runs"
    assert main(distill_args(inputs, out)) == 3
    run_dir = only_run(out)
    assert _stderr(capsys) == [
        "kd3 distill: error: training diverged at epoch 2, step 2: the weights are not finite after the optimizer step; "
        f"the last good checkpoint (epoch 1) is kept in {run_dir}/last.pt; lower train.lr (now 0.05) or check the "
        "teacher checkpoint"]
    assert faults.all_finite(checkpoint_state(run_dir)["method"].values()) and not (run_dir / "student.ts").exists()


def test_a_run_that_ends_at_chance_exports_no_student(inputs, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(distill_args(inputs, out, "train.lr=50")) == 3  # diverges to chance with finite weights
    run_dir = only_run(out)
    (line,) = _stderr(capsys)
    assert line.startswith("kd3 distill: error: the student is at chance: test accuracy ")
    assert "is not above 14.75% (1/10 + 3 SE on 359 images) while the teacher reaches 83.57%" in line
    assert line.endswith(f"not exported as student.ts (see {run_dir}/student.FAILED); the weights are in {run_dir}/last.pt")
    assert not (run_dir / "student.ts").exists() and checkpoint_state(run_dir)["epoch"] == 3
    for command in (["export", str(run_dir)], ["eval", str(run_dir), "--data", "uci-digits:test"]):
        assert main(command) == 2
        (refusal,) = _stderr(capsys)
        assert f"{run_dir} has no student.ts: kd3 exported no student from this run: the student is at chance" in refusal


def test_chance_rule_by_hand():
    assert faults.chance_threshold(10, 10_000) == pytest.approx(0.1 + 3 * 0.003)
    assert faults.chance_failure(0.105, 10_000, 10, teacher_accuracy=0.89) is not None
    assert faults.chance_failure(0.115, 10_000, 10, teacher_accuracy=0.89) is None
    assert faults.chance_failure(0.105, 10_000, 10, teacher_accuracy=0.10) is None  # teacher at chance: not judged
    assert faults.chance_failure(float("nan"), 0, 10, teacher_accuracy=0.89) is None  # no test set


# --- failed writes -------------------------------------------------------------------------------

@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     "the write stopped short, most likely no space left on device "
     "(torch: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598)"),
], ids=["ENOSPC", "torch-short-write"])
def test_a_checkpoint_write_that_fails_is_one_line_and_keeps_the_previous(inputs, tmp_path, monkeypatch, capsys,
                                                                         error, reason):
    real, calls = torch.save, itertools.count(1)

    def save(obj, handle, *args, **kwargs):
        if next(calls) == 2:  # epoch 2's checkpoint: half written, then the disk is full
            handle.write(b"half a checkpoint")
            raise error
        return real(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "runs"
    assert main(distill_args(inputs, out)) == faults.EXIT_WRITE_FAILED == 4
    run_dir = only_run(out)
    assert _stderr(capsys) == [f"kd3 distill: error: could not write {run_dir}/last.pt: {reason}; "
                               f"the previous checkpoint (epoch 1) is kept in {run_dir}/last.pt"]
    assert checkpoint_state(run_dir)["epoch"] == 1 and not list(run_dir.glob(".*"))  # no temp file left


def test_a_full_disk_is_reported_and_the_previous_checkpoint_kept(inputs, tmp_path, capsys):
    probe = tmp_path / "probe"
    assert main(distill_args(inputs, probe)) == 0
    checkpoint_bytes = (only_run(probe) / "last.pt").stat().st_size
    # Room for one checkpoint and the small files, not for the second one written beside it.
    with tmpfs(tmp_path / "disk", f"size={checkpoint_bytes * 3 // 2 + 16_384}") as disk:
        capsys.readouterr()
        assert main(distill_args(inputs, disk)) == 4
        run_dir = only_run(disk)
        (line,) = _stderr(capsys)
        assert line.startswith(f"kd3 distill: error: could not write {run_dir}/last.pt: ")
        assert line.endswith(f"; the previous checkpoint (epoch 1) is kept in {run_dir}/last.pt")
        assert checkpoint_state(run_dir)["epoch"] == 1 and not list(run_dir.glob(".*"))


def _unwritable_output(tmp_path: Path, kind: str) -> Iterator[tuple[Path, str]]:
    if kind == "under-a-file":
        (tmp_path / "file").write_text("")
        yield tmp_path / "file" / "runs", "Not a directory"
    else:
        with tmpfs(tmp_path / "ro", "ro,size=64k") as disk:
            yield disk / "runs", "Read-only file system"


@pytest.mark.parametrize("kind", ["under-a-file", "read-only"])
def test_an_unwritable_output_dir_fails_before_the_teacher_is_trained(inputs, tmp_path, capsys, monkeypatch, kind):
    monkeypatch.setenv("KD3_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "cache" / "teachers" / "mnist5k-lenet5_bn.pt"  # the recipe's own entry, missing: trained first
    recipe = f"teacher.recipe={REPO / 'configs/teachers/mnist5k-lenet5_bn.yaml'}"
    for output_dir, reason in _unwritable_output(tmp_path, kind):
        args = distill_args(inputs, output_dir, "teacher.checkpoint={cache}/teachers/mnist5k-lenet5_bn.pt", recipe)
        assert main(args) == 4
        captured = capsys.readouterr()
        assert captured.err.strip().splitlines() == [f"kd3 distill: error: could not write {output_dir}: {reason}; "
                                                     "nothing was trained"]
        assert "training it once" not in captured.out and not teacher.exists()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_pool_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    images = blobs(12)[0]
    monkeypatch.setattr(pools, "build_pool", lambda name, **knobs: Pool.unlabelled(images, origin=name))
    monkeypatch.setattr(Pool, "save", _disk_full)
    knobs = {"size": 12, "seed": 0}
    pool = pools.load_or_build_pool("digits-wild", tmp_path, **knobs)
    assert torch.equal(pool.images[:], images)
    assert _stderr(capsys) == [f"kd3: warning: could not write {pools.pool_cache_path('digits-wild', tmp_path, **knobs)}: "
                               "No space left on device; continuing without caching the pool (it is built again next time)"]


def test_a_score_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    pool, teacher, normalize = Pool.unlabelled(blobs(12)[0], "test"), TinyNet().eval(), Normalizer((0.2,), (0.3,))
    monkeypatch.setattr(score_cache, "atomic_save", _disk_full)
    outputs = score_cache.cached_teacher_outputs(pool, teacher, normalize, tmp_path)
    assert outputs.logits.shape == (12, 3)
    path = score_cache.cache_path(score_cache.cache_key(pool, teacher, normalize), tmp_path)
    assert _stderr(capsys) == [f"kd3: warning: could not write {path}: No space left on device; "
                               "continuing without caching the teacher pass (it is recomputed next time)"]
