"""Progress of long loops: a tqdm bar on a terminal, one plain line per loop anywhere else.

Redirected to a file, piped, or in CI, a bar is thousands of carriage-return frames in the log;
there each loop instead prints one line when it ends ("epoch 3/20: 78 steps, 12.3 s, loss 0.4100").
``enabled=False`` silences both (tests, and ranks other than 0).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _on_terminal() -> bool:
    # tqdm draws on stderr; a pipe, a file or CI's log collector is not a terminal.
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class PlainProgress(Generic[T]):
    """The bar's stand-in off a terminal: iterates, keeps the last postfix, prints one summary line."""

    def __init__(self, iterable: Iterable[T], desc: str):
        self.iterable, self.desc = iterable, desc
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def summary(self, steps: int, seconds: float) -> str:
        extra = "".join(f", {name} {value}" for name, value in self.postfix.items())
        return f"{self.desc}: {steps} steps, {seconds:.1f} s{extra}"

    def __iter__(self) -> Iterator[T]:
        steps, started = 0, time.perf_counter()
        for item in self.iterable:
            yield item
            steps += 1
        # Only a loop that ran to its end reports: an error's traceback says what happened otherwise.
        print(self.summary(steps, time.perf_counter() - started), file=sys.stderr, flush=True)


def progress(iterable: Iterable[T], desc: str, enabled: bool = True, **kwargs: Any) -> Iterable[T]:
    """``tqdm(iterable)`` on a terminal; elsewhere a ``PlainProgress`` (same ``set_postfix``)."""
    if enabled and not _on_terminal():
        return PlainProgress(iterable, desc)
    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)
