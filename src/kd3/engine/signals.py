"""Stopping a run on SIGINT / SIGTERM with its last checkpoint whole, and the test hook that lets a
test SIGKILL a run at a named point.

SIGTERM's default action ends Python at once, with no ``finally`` run and no word to the user; a
Ctrl-C's ``KeyboardInterrupt`` carries no signal number. ``raising_on_signals`` makes both raise
``Interrupted``: ``finally`` blocks run (``atomic_save`` removes its temp file), the trainer adds
where the run stands, and the CLI prints the resume command and exits 128 + the signal number,
as a shell would report the signal. ``deferred`` holds a signal back while a checkpoint is being
written, so that what the message says ``last.pt`` holds is exactly what it holds.

Only the CLI installs the handlers (and only in the main thread); a library caller keeps Python's
own ``KeyboardInterrupt``, which the trainer annotates all the same.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HANDLED = (signal.SIGINT, signal.SIGTERM)

# Test hook: ``KD3_TEST_PAUSE=POINT@EPOCH`` makes the process announce itself on stderr and sleep at
# that point of that (1-based) epoch, for a test to SIGKILL it there. Points: "selection" (the
# method's selection pass has built the epoch's plan, nothing of the epoch is on disk), "mid-epoch"
# (after the epoch's first optimizer step), "checkpoint-write" (the new last.pt is a complete temp
# file, not yet renamed over the old one).
PAUSE_ENV = "KD3_TEST_PAUSE"
PAUSE_ANNOUNCEMENT = "kd3 test pause:"
# Set by ``kd3 distill --nproc N`` (kd3.cli): a folder where each rank that stops writes why (rank-R.json) and the
# launcher writes its failed ranks' exit codes (launcher.json), for the one line kd3 prints once all have exited.
# Here, not in kd3.engine.distributed, because that parent must not import torch.
LAUNCH_STATUS_ENV = "KD3_LAUNCH_STATUS"
LAUNCHER_STATUS = "launcher.json"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal a process gets when its parent dies


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, with where the run stands once the trainer has seen it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: Path | None = None
        self.epoch: int | None = None  # the 1-based epoch that was running; None: training had not started
        self.saved_epoch = 0  # the epoch last.pt holds; 0: none was written (or not known yet)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def resumable(self) -> bool:
        return self.run_dir is not None and (self.run_dir / "last.pt").is_file()

    @property
    def cause(self) -> str:
        """What stopped the run, as the message's opening words."""
        return f"interrupted by {signal.Signals(self.signum).name}"

    def describe(self) -> str:
        if self.run_dir is None:  # outside any run (building a pool, ingesting, ...)
            return self.cause
        nothing = f"nothing to resume in {self.run_dir}, start the run again"
        if self.epoch is None:  # e.g. while the teacher it needs was being trained
            unchanged = f"; {self.run_dir / 'last.pt'} is as it was" if self.resumable else f": {nothing}"
            return f"{self.cause} before training started{unchanged}"
        during = f"{self.cause} during epoch {self.epoch}"
        if not self.resumable:
            return f"{during}, before any epoch finished: {nothing}"
        return f"{during}; {self.run_dir / 'last.pt'} holds the last finished epoch ({self.saved_epoch})"


class PeerLost(Interrupted):
    """Under torchrun: a collective failed because another process of the run stopped (killed, crashed).
    An ``Interrupted``, so that the trainer adds where the run stands, as for a signal."""

    exit_code = 1

    def __init__(self, error: str):
        super().__init__(signal.SIGTERM)
        # gloo's "[.../pair.cc:561] Connection closed by peer [127.0.0.1]:21922. This is typically caused by ...":
        # its first sentence, without the source location.
        first = re.sub(r"^\[[^\]]*\]\s*", "", error.strip()).split(". ")[0].splitlines()
        self.error = first[0] if first else "no message"

    @property
    def cause(self) -> str:
        return f"stopped because another process of the run did ({self.error})"


def as_interrupted(stop: KeyboardInterrupt, run_dir: Path, epoch: int | None, saved_epoch: int) -> Interrupted:
    """``stop`` (a plain Ctrl-C too) as an ``Interrupted`` that knows the run and its checkpoint."""
    interrupted = stop if isinstance(stop, Interrupted) else Interrupted(signal.SIGINT)
    interrupted.run_dir, interrupted.epoch, interrupted.saved_epoch = run_dir, epoch, saved_epoch
    return interrupted


_deferring = 0
_pending: list[int] = []
# The signal already raised in this ``raising_on_signals`` block. A repeat (a second Ctrl-C; torchrun's SIGTERM to a
# rank that someone had already signalled) is not raised again: it would cut short the cleanup the first one
# started (a checkpoint write finishing, temp files removed, worker processes stopped).
_raised: list[int] = []


def _handler(signum: int, frame: object) -> None:
    del frame
    if _raised:
        return
    if _deferring:
        _pending.append(signum)
        return
    _raised.append(signum)
    raise Interrupted(signum)


@contextmanager
def raising_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` inside the block; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    _raised.clear()
    previous = {signum: signal.signal(signum, _handler) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _raised.clear()


@contextmanager
def deferred() -> Iterator[None]:
    """A signal arriving inside the block is raised when the block has finished (not if it failed:
    its own error then propagates). Only under ``raising_on_signals``; SIGKILL cannot be deferred,
    which is why checkpoint writes are atomic as well."""
    global _deferring
    _deferring += 1
    try:
        yield
    except BaseException:
        _pending.clear()  # the block's own error is what stops the run
        raise
    finally:
        _deferring -= 1
    if not _deferring and _pending:
        signum = _pending[-1]
        _pending.clear()
        _raised.append(signum)
        raise Interrupted(signum)


def die_with_parent(signum: int, parent: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent (PID ``parent``) dies: a worker must
    not outlive the process that reads its results. Exits at once if the parent is already gone. False
    where the kernel cannot do it (not Linux): the caller watches for itself."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(128 + signum)
    return True


def pause_point(point: str, epoch: int) -> None:
    """The ``KD3_TEST_PAUSE`` hook (see above); does nothing unless the variable names this point."""
    if os.environ.get(PAUSE_ENV) != f"{point}@{epoch}":
        return
    print(f"{PAUSE_ANNOUNCEMENT} {point}@{epoch}", file=sys.stderr, flush=True)
    time.sleep(3600)
