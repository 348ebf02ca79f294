"""Atomic checkpoint files, RNG state capture, and teacher checkpoints with a checksum.

Everything is saved as tensors and plain Python values so that loading works with
``torch.load(weights_only=True)``: a checkpoint can never run code on load.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: Path, keep_previous: Path | None = None,
                before_replace: Callable[[], None] | None = None) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves half a file.

    The folder is fsynced after the rename too, or a power cut could lose the rename itself.
    ``keep_previous``: the file being replaced stays readable under that name (a hard link, so
    ``path`` exists at every moment). ``before_replace`` runs once the temp file is complete (the
    trainer's test pause point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        if keep_previous is not None and path.is_file():
            _link_over(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _link_over(source: Path, target: Path) -> None:
    """``target`` becomes another name of ``source``, replacing any old ``target`` atomically."""
    staged = target.with_name(f".{target.name}.{os.getpid()}.link")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:  # a file system without hard links: a copy does too
        shutil.copyfile(source, staged)
    os.replace(staged, target)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointUnreadable(ValueError):
    """``last.pt`` (and ``prev.pt``) cannot be read: damaged or truncated, not planted (those are refused)."""


# What torch.load raises on a truncated or damaged zip (not on a file that references code: that is
# an UnpicklingError, refused by kd3.utils.safe_load rather than replaced by an older checkpoint).
_DAMAGED = (EOFError, OSError, RuntimeError, KeyError, zipfile.BadZipFile)
REQUIRED = ("epoch", "method", "optimizer", "scheduler")


def _why_unreadable(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        state = load(path)
    except FileNotFoundError:
        return None, "missing"
    except _DAMAGED as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return None, f"damaged or truncated ({first[:120]})"
    missing = [key for key in REQUIRED if key not in state] if isinstance(state, dict) else list(REQUIRED)
    return (None, f"incomplete (no {', '.join(missing)})") if missing else (state, "")


def load_for_resume(last: Path, previous: Path) -> tuple[dict[str, Any], str | None]:
    """The state in ``last``, else in ``previous`` with a one-line note saying so; neither readable:
    ``CheckpointUnreadable`` naming both and what to do."""
    state, why = _why_unreadable(last)
    if state is not None:
        return state, None
    fallback, why_previous = _why_unreadable(previous)
    if fallback is not None:
        return fallback, (f"{last} is {why}; resuming from the checkpoint before it, {previous} "
                          f"(epoch {fallback['epoch']})")
    raise CheckpointUnreadable(f"{last} is {why} and {previous} is {why_previous}: this run cannot be resumed; "
                               "start it again without --resume")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def state_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A checksum of the weights themselves (names, shapes, dtypes, bytes), independent of pickling."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
