"""One owner per run directory: the process training in ``RUN`` holds ``fcntl.flock`` on ``RUN/.lock``.

A second ``kd3 distill --resume RUN`` (or a resume while the run is still alive) would otherwise
train and log the same epochs twice into one directory. The lock is the kernel's: it goes with the
process, so a SIGKILLed or crashed run leaves nothing stale and can be resumed at once. The holder
writes its PID into the file so that the refused process can say whom to wait for, and removes the
file when it is done (a killed run leaves it; it is then unlocked and harmless). Removal is safe
because a locker re-checks after locking that the path is still the file it locked: one that locked
a removed file tries again on the new one, so two processes never hold two inodes of one lock.
Under torchrun only rank 0 takes it: the ranks of one run are one owner.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kd3.engine import distributed

LOCK_FILE = ".lock"


class RunInUse(ValueError):
    """Another live process owns the run directory (a user error: exit 2, one line)."""


def _is_rank0() -> bool:
    """Rank 0, before or after the process group is joined (torchrun's RANK says it before)."""
    return distributed.rank() == 0 if distributed.active() else int(os.environ.get("RANK", "0")) == 0


def holder(run_dir: Path) -> int | None:
    """The PID the lock file names (the last process that owned the run; alive only while it is locked)."""
    try:
        return int((run_dir / LOCK_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Own ``run_dir`` for the block, or raise ``RunInUse`` naming the live owner's PID and what to do.

    Never waits: a run that is training will not be done in a moment, and queueing a second one
    behind it is what the lock exists to stop."""
    if not _is_rank0():
        yield
        return
    path = run_dir / LOCK_FILE
    fd = _lock(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: see the module docstring
        os.close(fd)  # closing the descriptor drops the lock


def _lock(path: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock, or ``RunInUse``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder(path.parent)
            who = f"kd3 process {pid}" if pid is not None else "another kd3 process"
            how = f"kill {pid}" if pid is not None else f"the process holding {path}"
            raise RunInUse(f"{path.parent} is in use by {who} (it holds {path}); wait for it or stop it: {how}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its last owner removed the file after this open: lock the one there now
