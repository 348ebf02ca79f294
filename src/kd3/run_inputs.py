"""What a distillation run was trained from, recorded in ``RUN/inputs.json`` and checked on ``--resume``.

config.yaml fixes the settings, but the teacher file, the pool file and the eval data live outside
the run: replaced between a kill and a resume, the run would finish on other inputs and ship a
student that no single setting produced. The record, per input:

- teacher: its path and ``TeacherInfo.sha256`` (the weights' checksum, verified on every load);
- pool: for a file pool its path and ``Pool.digest()`` — SHA-256 of the images and provenance,
  streamed in chunks (about 0.1 s for 20 000 32×32 RGB images), and for a pool directory cached in
  its meta.json under the images file's size and mtime, so a huge pool is not re-read on every
  run; content rather than size and mtime alone, because a copy or ``touch`` changes an mtime
  and not the pool, and a rewrite can keep both. A source pool is its SOURCE:SPLIT and a built
  pool its builder knobs (both made by kd3, from data it versions); every pool also its image
  count, which the checkpoint's per-image state (selections, caches) indexes;
- eval data: its name and a SHA-256 of its images, labels and class names (eval sets are small).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from kd3 import preflight
from kd3.config import DistillConfig
from kd3.data.pool import Pool
from kd3.data.sources import LabelledData
from kd3.engine import distributed, faults
from kd3.teacher import TeacherInfo

INPUTS_FILE = "inputs.json"
SHOWN_DIGEST = 12  # hex digits of a digest shown in a message


class InputsChanged(ValueError):
    """A resume whose teacher, pool or eval data is not the one the run started on (exit 2, one line)."""


def describe(cfg: DistillConfig, info: TeacherInfo, pool: Pool | None, pool_size: int, eval_data: LabelledData | None,
             uses_original_data: bool) -> dict[str, Any]:
    """The record of this run's inputs. ``pool``: the loaded file or source pool (None for a built pool or
    a method on the original data); ``pool_size``: the images training indexes."""
    p = cfg.pool
    if uses_original_data:
        pool_record: dict[str, Any] = {"kind": "original data", "source": info.data}
    elif p.name == "file":
        assert pool is not None  # check_distillation loads a file pool
        pool_record = {"kind": "file", "path": str(Path(p.path).resolve()), "sha256": pool.digest()}
    elif p.name == "source":
        pool_record = {"kind": "source", "source": p.source}
    else:
        pool_record = {"kind": "builder", "name": p.name, "size": p.size, "irrelevant_fraction": p.irrelevant_fraction,
                       "variant": p.variant, "seed": p.seed}
    pool_record["images"] = pool_size
    return {
        "teacher": {"path": str(preflight.teacher_path(cfg).resolve()), "sha256": info.sha256},
        "pool": pool_record,
        "eval_data": None if eval_data is None else {"data": cfg.eval_data, "images": len(eval_data),
                                                     "sha256": _labelled_digest(eval_data)},
    }


def _labelled_digest(data: LabelledData) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(data.images.shape), list(data.classes)]).encode())
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def record(run_dir: Path, inputs: dict[str, Any], note: str = "") -> None:
    """Write ``RUN/inputs.json`` (rank 0; whole or not at all), saying ``note`` on stderr first."""
    if not distributed.is_main():
        return
    if note:
        print(f"kd3: note: {note}", file=sys.stderr)
    path = run_dir / INPUTS_FILE
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with faults.writing(path, "nothing was trained"):
        try:
            staged.write_text(json.dumps(inputs, indent=1) + "\n")
            os.replace(staged, path)
        finally:
            staged.unlink(missing_ok=True)


def _recorded(run_dir: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((run_dir / INPUTS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"{run_dir / INPUTS_FILE} is unreadable ({str(error)[:80]}); it records what the run was "
                         "trained from, so the run cannot be resumed safely: start a new run") from None
    if not isinstance(found, dict):
        raise ValueError(f"{run_dir / INPUTS_FILE} is not a kd3 inputs record; start a new run")
    return found


def _shown(key: str, value: Any) -> str:
    return str(value)[:SHOWN_DIGEST] if key == "sha256" and value else str(value)


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One phrase per input that differs, naming it and each differing field old -> new (digests cut to
    ``SHOWN_DIGEST`` hex digits), e.g. ``pool /data/pool.npz changed (sha256 1a2b3c4d5e6f -> 9f8e7d6c5b4a)``."""
    found = []
    for section in ("teacher", "pool", "eval_data"):
        before, after = old.get(section), new.get(section)
        if before == after:
            continue
        if not isinstance(before, dict) or not isinstance(after, dict):
            found.append(f"{section} changed ({_shown('', before)} -> {_shown('', after)})")
            continue
        name = after.get("path") or after.get("source") or after.get("data") or after.get("name") or ""
        fields = [key for key in {**before, **after} if before.get(key) != after.get(key)]
        differences = ", ".join(f"{key} {_shown(key, before.get(key))} -> {_shown(key, after.get(key))}" for key in fields)
        found.append(f"{f'{section} {name}'.strip()} changed ({differences})")
    return found


def check(run_dir: Path, inputs: dict[str, Any], allow_changed: bool) -> tuple[dict[str, Any], str] | None:
    """On resume: the run's recorded inputs against ``inputs``. A change is refused (``InputsChanged``,
    one line) unless ``allow_changed``. A pool of another size is refused either way: the checkpoint's
    per-image state indexes the old one. Returns what to ``record`` (and say) once the checkpoint has
    loaded: an allowed change, or the inputs of a run from before inputs.json existed; else None."""
    old = _recorded(run_dir)
    if old is None:
        return inputs, (f"{run_dir} has no {INPUTS_FILE} (started by an older kd3): recording the current teacher and "
                        "pool; a change made before now cannot be detected")
    found = changes(old, inputs)
    if not found:
        return None
    images = old.get("pool", {}).get("images") if isinstance(old.get("pool"), dict) else None
    if images is not None and images != inputs["pool"]["images"]:
        raise InputsChanged(f"--resume {run_dir}: {'; '.join(found)}; the checkpoint's per-image state indexes the "
                            f"{images} images the run started on, so it cannot continue on this pool: start a new run")
    if not allow_changed:
        raise InputsChanged(f"--resume {run_dir}: {'; '.join(found)} since the run started; continue on the changed "
                            "inputs with --allow-changed-inputs, or start a new run")
    return ({**inputs, "allowed_changes": [*old.get("allowed_changes", []), *found]},
            f"continuing on changed inputs (--allow-changed-inputs): {'; '.join(found)}")
