"""Runs and caches shared by processes started at the same time: nobody's files are overwritten,
and what one process builds the others wait for and reuse."""
from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import torch

from kd3 import api
from kd3.data import pools
from kd3.data.pool import Pool

KNOBS = {"size": 30, "irrelevant_fraction": 0.5, "seed": 3}


def test_runs_started_in_the_same_second_never_share_a_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261203-120000")  # every run in one second
    start, made, errors = threading.Barrier(8), [], []

    def new_run() -> None:
        start.wait()
        try:
            made.append(api.new_run_dir(str(tmp_path / "runs"), "same"))
        except OSError as error:  # a directory claimed twice would show up here or as a duplicate
            errors.append(error)

    threads = [threading.Thread(target=new_run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(made)) == 8
    assert sorted(p.name for p in made) == ["same-20261203-120000", *(f"same-20261203-120000+{i}" for i in range(1, 8))]


def _slow_counted_build(marker: Path):
    def build(name: str, **knobs) -> Pool:
        with marker.open("a") as handle:  # one line per build, from whichever process builds
            handle.write("built\n")
        time.sleep(1.0)  # keeps the builder inside its lock while the other process arrives
        images = torch.from_numpy(np.random.default_rng(knobs["seed"]).integers(0, 255, (knobs["size"], 1, 28, 28),
                                                                              dtype=np.uint8))
        return Pool.unlabelled(images, origin=name)
    return build


def _build_in_child(cache: str, marker: str, start, results) -> None:
    pools.build_pool = _slow_counted_build(Path(marker))  # this process only
    start.wait()
    results.put(pools.load_or_build_pool("digits-wild", Path(cache), **KNOBS).digest())


def test_two_processes_building_one_pool_cache_build_it_once(tmp_path):
    context = multiprocessing.get_context("fork")  # the child inherits the imported modules: no re-import
    start, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_build_in_child, args=(str(tmp_path), str(tmp_path / "builds"), start, results))
                for _ in range(2)]
    for child in children:
        child.start()
    digests = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert (tmp_path / "builds").read_text() == "built\n"  # the second process waited and reused it
    path = pools.pool_cache_path("digits-wild", tmp_path, **KNOBS)
    assert digests[0] == digests[1] == Pool.load(path).digest()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]  # no temp file left
