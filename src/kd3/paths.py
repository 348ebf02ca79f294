"""Where kd3 keeps what it builds once and reuses (pools, teachers, caches)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$KD3_CACHE``, else ``$XDG_CACHE_HOME/kd3``, else ``~/.cache/kd3``."""
    if os.environ.get("KD3_CACHE"):
        return Path(os.environ["KD3_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kd3"


def expand(path: str) -> Path:
    """Expand ``{cache}`` and ``~`` in a configured path."""
    return Path(path.replace("{cache}", str(cache_dir()))).expanduser()
