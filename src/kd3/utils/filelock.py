"""Build a cached file once when several processes want it at the same time.

kd3 caches what is slow to make (a teacher trained from its recipe, a benchmark pool, a teacher
pass over a pool). Atomic writes already stop a reader from seeing half a file; the lock stops two
processes from both building it: the second waits on ``fcntl.flock`` of ``<target>.lock`` and then
finds the file the first one wrote. The ``.lock`` file is left in place on purpose: deleting it
would let a third process lock a new inode while the second still holds the old one.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


@contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target``'s ``.lock`` file (blocking); released on exit, and by the
    kernel if the process dies, so a killed builder never leaves others waiting."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd: int | None = os.open(lock_path(target), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only cache: nobody can write the target there, so there is nothing to guard
        fd = None
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def load_or_build(target: Path, load: Callable[[Path], T | None], build: Callable[[], T]) -> T:
    """``load(target)`` when it gives something (None: missing or unusable), else ``build()`` (which
    writes ``target``) under the lock, after a second look: another process may have built it while
    this one waited. The first look takes no lock, so a cache that is there costs nothing extra."""
    found = load(target)
    if found is not None:
        return found
    with file_lock(target):
        found = load(target)
        return found if found is not None else build()
