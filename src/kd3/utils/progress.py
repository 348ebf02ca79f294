"""Progress bars for long loops (tqdm), silenced in tests and non-interactive runs on request."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, enabled: bool = True, **kwargs) -> Iterable[T]:
    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)
