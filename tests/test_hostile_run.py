"""A run owns its directory and knows its inputs (issue 23, classes 1, 2, 3 and 11).

Each case is what a careless or hostile user does to a run: resume it while it is alive, resume it
twice, swap its pool or teacher between a kill and the resume, change a setting on resume, or name
it ``../../x``. Each asserts the exit code, the one line on stderr and that nothing was lost or
written where it should not be.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from kd3 import api
from kd3.cli import main
from kd3.config import ConfigError, DistillConfig, load_config
from kd3.data.pool import Pool
from kd3.engine import run_lock
from kd3.engine.trainer import lr_factor
from kd3.teacher import load_teacher, save_teacher
from tiny_runs import EPOCHS, checkpoint_state, distill_args, kill, only_run, start_paused, write_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-run")
    write_inputs(root)
    return root


@pytest.fixture(scope="module")
def finished(inputs):
    """A finished run (EPOCHS epochs, student shipped), copied by the tests that change it."""
    assert main(distill_args(inputs, inputs / "finished")) == 0
    return only_run(inputs / "finished")


def _stderr(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _snapshot(run_dir) -> dict[str, bytes]:
    """Every file of the run, by name: what a refused command must leave exactly as it was."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _stopped_after_one_epoch(inputs, out, *overrides: str):
    """A run killed (as far as its files go) after epoch 1 of EPOCHS: ``stop_after`` ends it there."""
    args = distill_args(inputs, out, *overrides)
    api.distill(args[1], args[2:], stop_after=1)
    run_dir = only_run(out)
    assert checkpoint_state(run_dir)["epoch"] == 1 and not (run_dir / "student.ts").exists()
    return run_dir


# -- class 1: a run directory has one owner ---------------------------------------------------------------------

def test_hostile_resume_of_a_live_run_is_refused_with_its_pid_until_it_is_killed(inputs, tmp_path, capsys):
    out = tmp_path / "runs"
    proc = start_paused(distill_args(inputs, out), "mid-epoch@2", tmp_path / "cache")
    run_dir = only_run(out)
    try:
        assert run_lock.holder(run_dir) == proc.pid
        before = _snapshot(run_dir)
        capsys.readouterr()
        assert main(["distill", "--resume", str(run_dir)]) == 2
        assert _stderr(capsys) == [f"kd3 distill: error: {run_dir} is in use by kd3 process {proc.pid} (it holds "
                                   f"{run_dir}/.lock); wait for it or stop it: kill {proc.pid}"]
        assert _snapshot(run_dir) == before  # the live run's checkpoint, log and config untouched
    finally:
        kill(proc)
    # SIGKILL ran nothing on the way out: the kernel dropped the lock, so the resume goes on at once.
    assert main(["distill", "--resume", str(run_dir)]) == 0
    assert checkpoint_state(run_dir)["epoch"] == EPOCHS and (run_dir / "student.ts").is_file()
    assert not (run_dir / ".lock").exists()  # its owner removes it when done
    assert [r["epoch"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_hostile_two_resumes_at_once_the_second_is_refused(inputs, finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "student.ts").unlink()
    first = start_paused(["distill", "--resume", str(run_dir), "train.epochs=4"], "mid-epoch@4", tmp_path / "cache")
    try:
        capsys.readouterr()
        assert main(["distill", "--resume", str(run_dir), "train.epochs=4"]) == 2
        assert _stderr(capsys) == [f"kd3 distill: error: {run_dir} is in use by kd3 process {first.pid} (it holds "
                                   f"{run_dir}/.lock); wait for it or stop it: kill {first.pid}"]
        assert checkpoint_state(run_dir)["epoch"] == EPOCHS  # the first resume's epoch 4 is not disturbed
    finally:
        kill(first)


# -- class 2: a run knows its inputs ------------------------------------------------------------------------------

def test_hostile_changed_pool_is_refused_then_accepted_with_the_flag(inputs, tmp_path, capsys):
    pool_path = tmp_path / "pool.npz"
    shutil.copy(inputs / "pool.npz", pool_path)
    run_dir = _stopped_after_one_epoch(inputs, tmp_path / "runs", f"pool.path={pool_path}")
    recorded = json.loads((run_dir / "inputs.json").read_text())
    old = Pool.load(pool_path).digest()
    assert recorded["pool"] == {"kind": "file", "path": str(pool_path.resolve()), "sha256": old, "images": 256}
    assert recorded["teacher"]["sha256"] == load_teacher(inputs / "teacher.pt")[1].sha256

    images = Pool.load(pool_path).images  # the same number of images, mirrored: another pool
    Pool.unlabelled(torch.flip(images, dims=[-1]), origin="folder").save(pool_path)
    new = Pool.load(pool_path).digest()
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir)]) == 2
    assert _stderr(capsys) == [f"kd3 distill: error: --resume {run_dir}: pool {pool_path.resolve()} changed (sha256 "
                               f"{old[:12]} -> {new[:12]}) since the run started; continue on the changed inputs with "
                               "--allow-changed-inputs, or start a new run"]
    assert _snapshot(run_dir) == before

    assert main(["distill", "--resume", str(run_dir), "--allow-changed-inputs"]) == 0
    err = _stderr(capsys)
    assert f"kd3: note: continuing on changed inputs (--allow-changed-inputs): pool {pool_path.resolve()} changed " \
           f"(sha256 {old[:12]} -> {new[:12]})" in err
    now = json.loads((run_dir / "inputs.json").read_text())
    assert now["pool"]["sha256"] == new and len(now["allowed_changes"]) == 1
    assert checkpoint_state(run_dir)["epoch"] == EPOCHS and (run_dir / "student.ts").is_file()


def test_hostile_changed_teacher_is_refused_by_its_checksum(inputs, tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(inputs / "teacher.pt", teacher)
    run_dir = _stopped_after_one_epoch(inputs, tmp_path / "runs", f"teacher.checkpoint={teacher}")
    net, info = load_teacher(teacher)
    old = info.sha256
    with torch.no_grad():
        next(net.parameters()).add_(0.01)  # a retrained teacher, as far as the run can tell
    save_teacher(teacher, net, info)
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir)]) == 2
    assert _stderr(capsys) == [f"kd3 distill: error: --resume {run_dir}: teacher {teacher.resolve()} changed (sha256 "
                               f"{old[:12]} -> {info.sha256[:12]}) since the run started; continue on the changed "
                               "inputs with --allow-changed-inputs, or start a new run"]
    assert _snapshot(run_dir) == before


def test_hostile_pool_of_another_size_is_refused_even_with_the_flag(inputs, tmp_path, capsys):
    pool_path = tmp_path / "pool.npz"
    shutil.copy(inputs / "pool.npz", pool_path)
    run_dir = _stopped_after_one_epoch(inputs, tmp_path / "runs", f"pool.path={pool_path}")
    Pool.unlabelled(Pool.load(pool_path).images[:200], origin="folder").save(pool_path)
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir), "--allow-changed-inputs"]) == 2
    (line,) = _stderr(capsys)
    assert line.startswith(f"kd3 distill: error: --resume {run_dir}: pool {pool_path.resolve()} changed (sha256 ")
    assert line.endswith("images 256 -> 200); the checkpoint's per-image state indexes the 256 images the run "
                         "started on, so it cannot continue on this pool: start a new run")
    assert _snapshot(run_dir) == before


def test_a_run_from_before_inputs_json_gets_one_on_resume(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    recorded = json.loads((run_dir / "inputs.json").read_text())
    (run_dir / "inputs.json").unlink()
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir)]) == 0
    assert f"kd3: note: {run_dir} has no inputs.json (started by an older kd3): recording the current teacher and " \
           "pool; a change made before now cannot be detected" in _stderr(capsys)
    assert json.loads((run_dir / "inputs.json").read_text()) == recorded


# -- class 3: resume overrides are applied or refused by name ------------------------------------------------------

def test_hostile_more_epochs_on_resume_continue_and_are_saved(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir), "train.epochs=4"]) == 0
    assert f"kd3: resuming {run_dir} with train.epochs 3 -> 4 (saved to {run_dir}/config.yaml)" in _stderr(capsys)
    cfg = load_config(DistillConfig, run_dir / "config.yaml")
    assert cfg.train.epochs == 4 and checkpoint_state(run_dir)["epoch"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    # Epoch 4 trains at the rate the stretched schedule gives it: milestones 0.625, 0.75, 0.875 of 4
    # epochs are epochs 2, 3, 4, so two of them have passed (0.05 × 0.1²); the 3-epoch schedule's
    # rate after its last epoch was 0.05 × 0.1³.
    assert cfg.train.milestones == [0.625, 0.75, 0.875] and cfg.train.gamma == 0.1
    assert records[3]["lr"] == pytest.approx(0.05 * 0.1**2) and records[2]["lr"] == pytest.approx(0.05 * 0.1**2)
    assert records[3]["lr"] == pytest.approx(cfg.train.lr * lr_factor(3, cfg.train))
    assert (run_dir / "student.ts").stat().st_mtime > (finished / "student.ts").stat().st_mtime  # shipped again


@pytest.mark.parametrize("override, line", [
    ("train.lr=0.1", "train.lr cannot change on resume (the run was trained with 0.05); start a new run, or change only "
                     "train.epochs, train.eval_every, train.threads, train.device, progress"),
    ("method.name=blind_kd", "method.name cannot change on resume (the run was trained with 'kd3'); start a new run, "
                             "or change only train.epochs, train.eval_every, train.threads, train.device, progress"),
    ("train.epochs=2", "train.epochs=2: {run}/last.pt has already trained 3 epochs; give train.epochs=3 or more"),
    ("nonsense.key=1", None),
])
def test_hostile_resume_override_of_a_fixed_setting_is_refused_by_name(finished, tmp_path, capsys, override, line):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(["distill", "--resume", str(run_dir), override]) == 2
    (err,) = _stderr(capsys)
    if line is None:
        assert err.startswith(f"kd3 distill: error: {run_dir}/config.yaml: unknown key 'nonsense'")
    else:
        assert err == "kd3 distill: error: " + line.format(run=run_dir)
    assert _snapshot(run_dir) == before  # config.yaml, last.pt, metrics.jsonl and student.ts as they were


def test_hostile_resume_with_a_config_file_is_refused(finished, tmp_path, capsys):
    capsys.readouterr()
    assert main(["distill", "other.yaml", "--resume", str(finished)]) == 2
    assert _stderr(capsys) == [f"kd3 distill: error: --resume {finished} continues with the run's own config.yaml; "
                               "drop other.yaml (key=value overrides of train.epochs, train.eval_every, ... may follow)"]


# -- class 11: the run directory stays inside output_dir -----------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "/tmp/x"])
def test_hostile_name_with_a_path_is_refused_and_nothing_is_created(inputs, tmp_path, capsys, name):
    out = tmp_path / "deep" / "runs"
    capsys.readouterr()
    assert main(distill_args(inputs, out, f"name={name}")) == 2
    (err,) = _stderr(capsys)
    assert err.startswith("kd3 distill: error: ") and err.endswith(
        f"name: must be a plain name for the run folder, without / \\ or .. (e.g. name=my-run), got {name!r}")
    assert list(tmp_path.iterdir()) == []  # not output_dir, not ../../x


def test_hostile_run_dir_outside_output_dir_is_refused_for_an_api_config(tmp_path):
    with pytest.raises(ConfigError, match=r"would put the run folder outside output_dir="):
        api.new_run_dir(str(tmp_path / "runs"), "../../x")
    assert list(tmp_path.iterdir()) == []
