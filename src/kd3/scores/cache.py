"""The teacher pass of a pool, cached on disk: ``<cache>/scores/<pool digest>-<teacher sha256>-<key>.pt``.

The key covers everything the pass depends on: the pool's content digest (``Pool.digest``), the
teacher's weights checksum (``state_sha256`` of its state dict, the value ``TeacherInfo.sha256``
records), the input normalisation and ``SCORES_VERSION``. Any other teacher, even one with the same
architecture, therefore gets its own file; the full key is stored inside and checked on load too.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from kd3.data.augment import Normalizer
from kd3.data.pool import Pool
from kd3.engine.checkpoint import atomic_save, state_sha256
from kd3.engine.faults import best_effort
from kd3.scores.outputs import TeacherOutputs, teacher_outputs
from kd3.utils.filelock import load_or_build
from kd3.utils.safe_load import refuse_unsafe

# Bump when what the pass stores, or how, changes: it invalidates every cached file.
SCORES_VERSION = 2  # 2: adds TeacherOutputs.bn_grid (the other fields are unchanged)


def cache_key(pool: Pool, teacher: nn.Module, normalize: Normalizer) -> dict:
    return {"pool": pool.digest(), "teacher": state_sha256(teacher.state_dict()),
            "mean": normalize.mean.flatten().tolist(), "std": normalize.std.flatten().tolist(),
            "version": SCORES_VERSION}


def cache_path(key: dict, cache_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "scores" / f"{key['pool'][:12]}-{key['teacher'][:12]}-{digest[:8]}.pt"


def cached_teacher_outputs(pool: Pool, teacher: nn.Module, normalize: Normalizer, cache_dir: Path,
                           batch_size: int = 1024, device: torch.device | str = "cpu",
                           show_progress: bool = False) -> TeacherOutputs:
    """The pool's teacher outputs from the cache, or from one pass that is then saved (one pass when
    several processes ask at once: the others wait on the cache's lock, then read it)."""
    key = cache_key(pool, teacher, normalize)
    path = cache_path(key, cache_dir)

    def compute() -> TeacherOutputs:
        outputs = teacher_outputs(teacher, pool.images, normalize, batch_size, device, show_progress)
        with best_effort(path, "the teacher pass (it is recomputed next time)"):
            atomic_save({"key": key, **outputs.to_record()}, path)
        return outputs

    return load_or_build(path, lambda found: _cached(found, key), compute)


def _cached(path: Path, key: dict) -> TeacherOutputs | None:
    if not path.is_file():
        return None
    try:
        with refuse_unsafe(path, "kd3 score cache"):  # a file that references code is refused, not overwritten
            record = torch.load(path, map_location="cpu", weights_only=True)
        if record.get("key") == key:
            return TeacherOutputs.from_record(record)
    except (OSError, RuntimeError, KeyError, zipfile.BadZipFile):
        pass  # unreadable (e.g. a disk that filled mid-write): recompute and overwrite
    return None
