"""Crawled files and careless values never cost data, hang or end in a traceback (issue 23, classes 5,
6, 7, 9 and 10).

Each case is what a careless or hostile user (or a crawl) hands kd3: a shard with an odd member, an
``--out`` that holds the user's own files or a killed ingest's temp file, a FIFO or a device or random
bytes as a pool, a budget of almost nothing, a damaged file where kd3 expects its own. Each asserts the
exit code, the one line on stderr, and what was kept: every later shard sample, the user's files byte
for byte, the pool already there, the run's checkpoint.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd3 import api
from kd3.cli import main
from kd3.data import storage
from kd3.data.pool import Pool
from kd3.data.sources import load_source
from kd3.engine import faults
from standins import write_teacher

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/digits-wild/blind_kd.yaml")
KD3_CONFIG = str(REPO / "configs/digits-wild/kd3.yaml")


# -- helpers ----------------------------------------------------------------------------------------------------------

def _png(value: int) -> bytes:
    """An 8×8 grey PNG of one value: the pool image's maximum names the member it came from."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> None:
    """``members``: (name, data, tar type); data None for a member with no file data (links, FIFOs, devices)."""
    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "000.png"
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """Exit code, stdout and kd3's own stderr lines of ``kd3 ARGV`` (a progress bar's closing summary,
    also on stderr, left out), after checking that nothing ended in a traceback."""
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("kd3")]


def _ingest(source: Path | str, out: Path, capsys) -> tuple[int, str, list[str]]:
    return _cli(["data", "ingest", str(source), "--size", "8", "--channels", "1", "--out", str(out), "--workers", "1"],
                capsys)


def _values(pool: Pool) -> list[int]:
    return [int(image.max()) for image in pool.images[:]]


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by name: what a refused command must leave exactly as it was."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    """The PID of a process that has exited (a killed ingest's, as far as its temp file can tell)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An untrained 1×28×28 10-class teacher and a 64-image UCI-digits pool: seconds per run."""
    root = tmp_path_factory.mktemp("hostile-files")
    write_teacher(root / "teacher.pt")
    Pool.unlabelled(load_source("uci-digits:train").images[:64], origin="folder").save(root / "pool.npz")
    return root


def _distill_args(root: Path, out: Path, *overrides: str, config: str = CONFIG) -> list[str]:
    return ["distill", config, f"teacher.checkpoint={root / 'teacher.pt'}", "teacher.recipe=", "pool.name=file",
            f"pool.path={root / 'pool.npz'}", "eval_data=", "train.epochs=2", "train.epoch_steps=2",
            "train.batch_size=32", "train.threads=1", "progress=false", f"output_dir={out}", *overrides]


@pytest.fixture(scope="module")
def stopped(inputs, tmp_path_factory):
    """A run whose files are those of a kill after epoch 1 of 2 (``stop_after``); tests copy it."""
    out = tmp_path_factory.mktemp("stopped")
    args = _distill_args(inputs, out)
    api.distill(args[1], args[2:], stop_after=1)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    return run_dir


def _copy_run(stopped: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / stopped.name
    shutil.copytree(stopped, run_dir)
    (run_dir / ".lock").unlink(missing_ok=True)
    return run_dir


# -- class 5: one odd shard member costs only itself ---------------------------------------------------------------

def test_hostile_shard_duplicates_links_and_special_members_keep_every_later_sample(tmp_path, capsys):
    reg, sym, lnk = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    _write_tar(tmp_path / "00000.tar", [
        ("000.png", _png(10), reg), ("000.png", _png(99), reg),  # a name written twice in a row
        ("001.png", _png(11), reg), ("002.png", None, sym), ("003.png", None, lnk),
        ("004.png", None, tarfile.FIFOTYPE), ("005.png", None, tarfile.CHRTYPE), ("006.png", None, tarfile.BLKTYPE),
        ("007.png", _png(12), reg), ("001.png", _png(98), reg),  # an old name again, far from its first copy
        ("008.png", _png(13), reg)])
    code, out, err = _ingest(tmp_path / "00000.tar", tmp_path / "pool", capsys)
    assert (code, err) == (0, [])
    assert "4 of 11 images loaded" in out
    assert "skipped 7 (2 duplicate member, 2 link member, 3 special member;" in out
    assert f"{tmp_path / '00000.tar'}:002.png (link member)" in out
    pool = Pool.load(tmp_path / "pool")
    assert _values(pool) == [10, 11, 12, 13]  # first copies kept, every later sample kept, in order
    assert pool.meta["counts"]["reasons"] == {"duplicate member": 2, "link member": 2, "special member": 3}


def test_hostile_shard_appended_with_tar_r_keeps_every_sample_and_counts_the_duplicate(tmp_path, capsys):
    if shutil.which("tar") is None:
        pytest.skip("no tar program")
    files = tmp_path / "files"
    files.mkdir()
    for i in range(4):
        (files / f"{i:03d}.png").write_bytes(_png(20 + i))
    shard = tmp_path / "crawl.tar"
    subprocess.run(["tar", "-cf", str(shard), "-C", str(files), "000.png", "001.png", "002.png"], check=True)
    (files / "001.png").write_bytes(_png(77))  # "updated", then appended: tar -r writes a second 001.png
    subprocess.run(["tar", "-rf", str(shard), "-C", str(files), "001.png", "003.png"], check=True)
    code, out, err = _ingest(shard, tmp_path / "pool", capsys)
    assert (code, err) == (0, [])
    assert "4 of 5 images loaded" in out and "1 duplicate member" in out and "truncated" not in out
    assert _values(Pool.load(tmp_path / "pool")) == [20, 21, 22, 23]


def test_hostile_shard_with_a_damaged_header_keeps_the_members_after_it(tmp_path, capsys):
    shard = tmp_path / "00000.tar"
    _write_tar(shard, [(f"{i:03d}.png", _png(30 + i), tarfile.REGTYPE) for i in range(5)])
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[1].offset
    data = bytearray(shard.read_bytes())
    data[second:second + 100] = b"x" * 100  # the second member's header: its name and sizes are gone
    shard.write_bytes(bytes(data))
    code, out, err = _ingest(shard, tmp_path / "pool", capsys)
    assert (code, err) == (0, [])
    assert "1 damaged tar region" in out and f"{shard} at byte {second} (damaged tar region)" in out
    assert _values(Pool.load(tmp_path / "pool")) == [30, 32, 33, 34]


def test_hostile_concatenated_shards_are_read_whole(tmp_path, capsys):
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    _write_tar(first, [(f"{i:03d}.png", _png(40 + i), tarfile.REGTYPE) for i in range(3)])
    _write_tar(second, [(f"{i:03d}.png", _png(47 + i), tarfile.REGTYPE) for i in range(3, 6)])
    (tmp_path / "cat.tar").write_bytes(first.read_bytes() + second.read_bytes())  # `cat a.tar b.tar`
    code, out, err = _ingest(tmp_path / "cat.tar", tmp_path / "pool", capsys)
    assert (code, err) == (0, []) and "6 of 6 images loaded" in out and "skipped" not in out
    assert _values(Pool.load(tmp_path / "pool")) == [40, 41, 42, 50, 51, 52]


# -- class 6: ingest writes only over what it made ------------------------------------------------------------------

@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard.tar"
    _write_tar(path, [(f"{i:03d}.png", _png(60 + i), tarfile.REGTYPE) for i in range(3)])
    return path


def test_hostile_ingest_into_a_directory_of_the_users_own_files_is_refused(tmp_path, shard, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "meta.json").write_text('{"my": "notes"}\n')
    np.save(out / "images.npy", np.arange(12))
    before = _snapshot(out)
    code, _, err = _ingest(shard, out, capsys)
    assert code == 2
    assert err == [f"kd3 data: error: --out {out} is not a kd3 pool directory (its meta.json is not one kd3 wrote; it "
                   "holds images.npy, meta.json): kd3 data ingest writes only into a new or empty directory or over a "
                   "pool it wrote; give another --out"]
    assert _snapshot(out) == before and sorted(os.listdir(out)) == ["images.npy", "meta.json"]


def test_hostile_ingest_over_a_foreign_npz_is_refused(tmp_path, shard, capsys):
    out = tmp_path / "results.npz"
    np.savez(out, scores=np.arange(5))
    before = out.read_bytes()
    code, _, err = _ingest(shard, out, capsys)
    assert code == 2 and err == [f"kd3 data: error: --out {out} exists and is not a kd3 pool .npz; kd3 data ingest writes "
                                 "a new file or over a pool it wrote: give another --out"]
    assert out.read_bytes() == before


def test_hostile_reingest_over_its_own_pool_replaces_it_and_clears_a_killed_ingests_temp(tmp_path, shard, capsys):
    out = tmp_path / "pool"
    assert _ingest(shard, out, capsys)[0] == 0
    stale = out / f".images.npy.{_dead_pid()}.tmp"
    stale.write_bytes(b"\0" * 4096)  # what a SIGKILLed ingest leaves
    alive = subprocess.Popen(["sleep", "60"])
    try:
        live = out / f".images.npy.{alive.pid}.tmp"  # an ingest still writing: not ours to remove
        live.write_bytes(b"\0" * 10)
        user = out / f".notes.{_dead_pid()}.tmp"  # the pattern, but no pool file's name: never touched
        user.write_text("mine")
        _write_tar(shard, [(f"{i:03d}.png", _png(70 + i), tarfile.REGTYPE) for i in range(4)])
        code, out_text, err = _ingest(shard, out, capsys)
    finally:
        alive.kill()
        alive.wait()
    assert (code, err) == (0, []) and "4 of 4 images loaded" in out_text
    assert not stale.exists() and live.exists() and user.read_text() == "mine"
    assert _values(Pool.load(out)) == [70, 71, 72, 73]


@pytest.mark.parametrize("failure", ["unwritable", "disk full"])
def test_hostile_reingest_that_cannot_write_is_the_exit_4_line_and_keeps_the_pool(tmp_path, shard, capsys, monkeypatch,
                                                                                     failure):
    out = tmp_path / "pool"
    assert _ingest(shard, out, capsys)[0] == 0
    before, digest = _snapshot(out), Pool.load(out).digest()
    if failure == "unwritable":  # what a read-only directory answers (root is not refused by chmod, so simulated)
        real_open = open

        def refusing_open(path, mode="r", *args, **kwargs):
            if "w" in mode:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(storage, "open", refusing_open, raising=False)
        reason = "Permission denied"
    else:
        def full(self, images):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(storage.ImageWriter, "write", full)
        reason = "No space left on device"
    code, _, err = _ingest(shard, out, capsys)
    assert code == faults.EXIT_WRITE_FAILED == 4
    assert err == [f"kd3 data: error: could not write {out / 'images.npy'}: {reason}; the pool already in {out} is unchanged"]
    assert _snapshot(out) == before and Pool.load(out).digest() == digest  # no temp file left, the old pool intact


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_hostile_reingest_into_a_read_only_directory_is_the_exit_4_line(tmp_path, shard, capsys):
    out = tmp_path / "pool"
    assert _ingest(shard, out, capsys)[0] == 0
    before = _snapshot(out)
    out.chmod(0o555)
    try:
        code, _, err = _ingest(shard, out, capsys)
    finally:
        out.chmod(0o755)
    assert code == 4 and err == [f"kd3 data: error: could not write {out / 'images.npy'}: Permission denied; "
                                 f"the pool already in {out} is unchanged"]
    assert _snapshot(out) == before


def test_hostile_ingest_that_decodes_nothing_leaves_no_temp_file(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    code, _, err = _ingest(junk, tmp_path / "pool", capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"kd3 data: error: no readable image in {junk}: 1 skipped")
    assert list((tmp_path / "pool").iterdir()) == []


# -- class 7: special files are refused before they are opened --------------------------------------------------------

def _released_after(fifo: Path, seconds: float) -> threading.Timer:
    """A guard, not a timing test: if a reader still waits on ``fifo`` after ``seconds``, open and close
    its write end so that the reader gets EOF and the test fails instead of hanging the suite."""
    def release() -> None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waiting: nothing to release
    timer = threading.Timer(seconds, release)
    timer.start()
    return timer


def test_hostile_fifo_as_pool_path_is_refused_without_waiting(inputs, tmp_path, capsys):
    fifo = tmp_path / "pool.npz"
    os.mkfifo(fifo)
    guard = _released_after(fifo, 60)
    try:
        code, _, err = _cli(_distill_args(inputs, tmp_path / "runs", f"pool.path={fifo}"), capsys)
    finally:
        guard.cancel()
    assert code == 2
    assert err == [f"kd3 distill: error: {fifo} is not a kd3 pool (an .npz or a directory written by `kd3 data ingest` or "
                   "`kd3 data build`): it is a FIFO (named pipe), not a regular file; nothing was read from it"]
    assert not (tmp_path / "runs").exists()


def test_hostile_fifo_as_a_pool_directory_file_is_refused_without_waiting(tmp_path, shard, capsys):
    out = tmp_path / "pool"
    assert _ingest(shard, out, capsys)[0] == 0
    (out / "meta.json").unlink()
    os.mkfifo(out / "meta.json")
    guard = _released_after(out / "meta.json", 60)
    try:
        code, _, err = _cli(["data", "build", str(out)], capsys)
    finally:
        guard.cancel()
    assert code == 2 and err == [f"kd3 data: error: {out} is not a complete kd3 pool directory: no regular file meta.json "
                                 "there (write one with `kd3 data ingest ... --out DIR`)"]


def test_hostile_device_as_pool_path_is_refused(inputs, tmp_path, capsys):
    code, _, err = _cli(_distill_args(inputs, tmp_path / "runs", "pool.path=/dev/zero"), capsys)
    assert code == 2 and err == ["kd3 distill: error: /dev/zero is not a kd3 pool (an .npz or a directory written by "
                                 "`kd3 data ingest` or `kd3 data build`): it is a character device, not a regular file; "
                                 "nothing was read from it"]
    assert not (tmp_path / "runs").exists()


def test_hostile_random_bytes_as_pool_are_not_a_kd3_pool_and_never_allow_pickle(tmp_path, capsys):
    pool = tmp_path / "pool.npz"
    pool.write_bytes(np.random.default_rng(0).bytes(5000))
    code, _, err = _cli(["data", "build", str(pool)], capsys)
    assert code == 2 and err == [f"kd3 data: error: {pool} is not a kd3 pool (an .npz or a directory written by `kd3 data "
                                 "ingest` or `kd3 data build`): it is not a zip archive (a truncated download, or another "
                                 "kind of file)"]
    assert "allow_pickle" not in err[0]


# -- class 9: a budget of almost nothing is refused before anything runs ----------------------------------------------

def test_hostile_pool_smaller_than_one_batch_is_refused(inputs, tmp_path, capsys):
    small = tmp_path / "small.npz"
    Pool.unlabelled(load_source("uci-digits:train").images[:1], origin="folder").save(small)
    code, _, err = _cli(_distill_args(inputs, tmp_path / "runs", f"pool.path={small}"), capsys)
    assert code == 2 and err == [f"kd3 distill: error: pool.path={small}: an epoch can train on at most 1 image (a pool of "
                                 "1 image), fewer than one batch (train.batch_size=32); use a pool of at least 32 images"]
    assert not (tmp_path / "runs").exists()


def test_hostile_selection_budget_smaller_than_one_batch_is_refused(inputs, tmp_path, capsys):
    # KD³ with percentile thresholds keeps floor(0.1 · 64) = 6 images at most: not one batch of 32.
    args = _distill_args(inputs, tmp_path / "runs", "method.thresholds=percentile", "method.keep_fraction=0.1",
                         config=KD3_CONFIG)
    code, _, err = _cli(args, capsys)
    assert code == 2 and err == [f"kd3 distill: error: pool.path={inputs / 'pool.npz'}: an epoch can train on at most 6 "
                                 "images (method.keep_fraction=0.1 of 64 pool images), fewer than one batch "
                                 "(train.batch_size=32); use a larger method.keep_fraction or a bigger pool or "
                                 "train.batch_size=6 or less"]
    assert not (tmp_path / "runs").exists()


def test_hostile_selection_budget_that_leaves_classes_no_image_is_refused(inputs, tmp_path, capsys):
    # floor(0.1 · 64) = 6 images shared equally by 10 classes: 0 each.
    args = _distill_args(inputs, tmp_path / "runs", "method.thresholds=percentile", "method.keep_fraction=0.1",
                         "train.batch_size=4", config=KD3_CONFIG)
    code, _, err = _cli(args, capsys)
    assert code == 2 and err == [f"kd3 distill: error: pool.path={inputs / 'pool.npz'}: the selection budget of 6 images "
                                 "(method.keep_fraction=0.1 of 64 pool images) is shared equally by the teacher's 10 "
                                 "classes, so no class keeps an image; use a larger method.keep_fraction or a bigger pool"]


def test_hostile_batch_of_one_is_refused(inputs, tmp_path, capsys):
    code, _, err = _cli(_distill_args(inputs, tmp_path / "runs", "train.batch_size=1"), capsys)
    assert code == 2 and err == ["kd3 distill: error: train.batch_size=1: a batch of one image gives BatchNorm no batch "
                                 "statistics, so training fails or learns nothing; use train.batch_size=2 or more "
                                 "(default 256)"]
    assert not (tmp_path / "runs").exists()


def test_hostile_student_whose_accuracy_is_not_a_number_is_never_shipped():
    # With a test set, NaN is a failure whatever the teacher (none recorded, at chance, or good) ...
    for teacher in (None, 0.1, 0.9):
        reason = faults.chance_failure(float("nan"), 1797, 10, teacher)
        assert reason is not None and reason.startswith("the student's test accuracy on 1797 images is nan (not a number)")
    # ... without one there is nothing to judge, and a real accuracy above chance ships.
    assert faults.chance_failure(float("nan"), 0, 10, 0.9) is None
    assert faults.chance_failure(0.8, 1797, 10, 0.9) is None


# -- class 10: damaged or foreign files get one line ----------------------------------------------------------------

def test_hostile_npz_of_images_only_names_the_missing_arrays(tmp_path, capsys):
    pool = tmp_path / "pool.npz"
    np.savez(pool, images=np.zeros((4, 1, 28, 28), np.uint8))
    code, _, err = _cli(["data", "build", str(pool)], capsys)
    assert code == 2 and err == [f"kd3 data: error: {pool} is not a kd3 pool (an .npz or a directory written by `kd3 data "
                                 "ingest` or `kd3 data build`): it holds images, not source, style, relevant, true_label, "
                                 "meta"]


def test_hostile_truncated_npz_pool_is_one_line(inputs, tmp_path, capsys):
    pool = tmp_path / "pool.npz"
    whole = (inputs / "pool.npz").read_bytes()
    pool.write_bytes(whole[:len(whole) // 2])  # a download cut in half
    code, _, err = _cli(_distill_args(inputs, tmp_path / "runs", f"pool.path={pool}"), capsys)
    assert code == 2 and err == [f"kd3 distill: error: {pool} is not a kd3 pool (an .npz or a directory written by `kd3 "
                                 "data ingest` or `kd3 data build`): it is not a zip archive (a truncated download, or "
                                 "another kind of file)"]


def test_hostile_corrupt_meta_json_is_named(tmp_path, shard, capsys):
    out = tmp_path / "pool"
    assert _ingest(shard, out, capsys)[0] == 0
    (out / "meta.json").write_text('{"pool": "ingested", "size": ')  # cut mid-write by hand
    before = _snapshot(out)
    code, _, err = _cli(["data", "build", str(out)], capsys)
    assert code == 2 and err == [f"kd3 data: error: {out / 'meta.json'} is not the JSON object kd3 writes (Expecting value: "
                                 "line 1 column 30 (char 29)); restore it, or write the pool again with `kd3 data ingest "
                                 f"SOURCE ... --out {out}`"]
    assert _snapshot(out) == before


def test_hostile_garbage_images_file_in_a_pool_directory_is_named(tmp_path, shard, capsys):
    out = tmp_path / "pool"
    assert _ingest(shard, out, capsys)[0] == 0
    (out / "images.npy").write_bytes(np.random.default_rng(1).bytes(300))
    code, _, err = _cli(["data", "build", str(out)], capsys)
    assert code == 2 and err == [f"kd3 data: error: {out / 'images.npy'} is not a kd3 pool images file (a uint8 .npy "
                                 "written by kd3 data ingest): the magic string is not correct"]


def test_hostile_garbage_and_foreign_student_ts_are_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.ts"
    garbage.write_bytes(np.random.default_rng(2).bytes(3000))
    code, _, err = _cli(["eval", str(garbage), "--data", "uci-digits:test"], capsys)
    assert code == 2 and err == [f"kd3 eval: error: {garbage} is not a TorchScript file kd3 can read (PytorchStreamReader "
                                 "failed reading zip archive: failed finding central directory)"]
    foreign = tmp_path / "foreign.ts"
    torch.jit.save(torch.jit.trace(torch.nn.Flatten(), torch.zeros(1, 1, 28, 28)), foreign)  # a .ts kd3 did not export
    code, _, err = _cli(["eval", str(foreign), "--data", "uci-digits:test"], capsys)
    assert code == 2 and err == [f"kd3 eval: error: {foreign} has no kd3 metadata (mean, std, classes, in_channels, "
                                 "image_size missing): not a model kd3 exported"]


def test_hostile_torn_last_metrics_line_is_moved_aside_and_the_run_resumes(stopped, tmp_path, capsys):
    run_dir = _copy_run(stopped, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    first = metrics.read_text()
    torn = '{"epoch": 2, "lr": 0.1, "loss": 0.5, "plan_ti'  # a kill in the middle of the epoch-2 write
    metrics.write_text(first + torn)
    code, _, err = _cli(["distill", "--resume", str(run_dir)], capsys)
    assert code == 0
    assert err == [f"kd3: warning: {metrics}: line 2 is not a whole JSON record (a write cut short?); moved to "
                   f"{metrics}.damaged, resuming from the checkpoint"]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and metrics.read_text().startswith(first)  # epoch 1 kept as it was
    assert (run_dir / "metrics.jsonl.damaged").read_text() == torn + "\n"  # the torn bytes kept, not lost
    assert (run_dir / "student.ts").is_file()


def test_hostile_resume_into_another_architecture_is_one_line_and_keeps_the_checkpoint(stopped, tmp_path, capsys):
    run_dir = _copy_run(stopped, tmp_path)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("student: lenet5_half_bn", "student: lenet5_bn"))
    before = _snapshot(run_dir)
    code, _, err = _cli(["distill", "--resume", str(run_dir)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"kd3 distill: error: --resume {run_dir}: the checkpoint {run_dir / 'last.pt'} does not fit "
                             f"the model {config} builds now: its weights are not this model's (")
    assert "of another shape; " in err[0] and " is (" in err[0]
    assert err[0].endswith("was config.yaml edited to another model or method? restore it, or start a new run")
    after = _snapshot(run_dir)
    assert {k: after[k] for k in before if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("kind", ["fifo", "random-bytes", "bare-npy"])
def test_hostile_labelled_npz_that_is_no_archive_is_one_line_and_never_blocks(tmp_path, kind):
    """eval_data / kd3 eval --data / train-teacher data given as an .npz that is a FIFO, random bytes or a
    renamed .npy: one ValueError naming the file, returned at once (a FIFO opened for reading would block)."""
    from kd3.data.labelled import load_labelled

    path = tmp_path / "mine.npz"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        with open(path, "wb") as f:
            np.save(f, np.zeros((2, 8, 8), np.uint8))
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_labelled(str(path), 8, 1)
        except BaseException as error:  # handed to the test thread
            outcome.append(error)

    worker = threading.Thread(target=load, daemon=True)  # a daemon: a regression that blocks cannot hang the suite
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive() and len(outcome) == 1 and isinstance(outcome[0], ValueError), outcome
    message = str(outcome[0])
    assert message.startswith(f"{path} is not a labelled .npz: ") and "\n" not in message
    assert "allow_pickle" not in message
    if kind == "fifo":
        assert "FIFO" in message
