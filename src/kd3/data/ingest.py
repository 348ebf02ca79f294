"""Turn user images (a folder, or img2dataset/WebDataset tar shards) into a ``Pool``.

Decoding fans out over worker processes; results are consumed in task order (sorted paths, or
shard order then member order), so the pool is the same whatever the number of workers, and a
folder and shards holding the same images in the same order give byte-identical pools. With an
output directory the images are written as they arrive (memory stays bounded by a few tasks'
worth of images); files that do not decode are skipped and counted per reason.

``out`` is written only when it is new, empty or a pool kd3 wrote (``kd3.data.pool.is_pool``):
a user's own files there are never replaced. The temp files a killed ingest left in it are
removed first; a write that fails (a full disk, a read-only directory) is one
``kd3.engine.faults.WriteFailed`` line (exit 4) and leaves no temp file behind.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kd3.data.decode import read_and_decode
from kd3.data.pool import META_FILE, POOL_FILES, Pool, atomic_write, is_pool, write_pool_arrays
from kd3.data.shards import decode_shard, expand_shards, is_shard_spec
from kd3.data.storage import IMAGES_FILE, DiskImages, ImageWriter, is_temp_of, remove_stale_temps
from kd3.engine import faults
from kd3.utils.progress import progress

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm"})
MAX_BAD_PATHS = 10  # how many unreadable files the report names; the counts cover them all
FOLDER_TASK = 512  # files per worker task: big enough to amortise the round trip
ORIGIN = "ingested"  # the source of every ingested image, folder or shards alike
SIDECAR_FILE = "sidecar.jsonl"  # per-image metadata from img2dataset's json/txt members

Decoded = tuple[np.ndarray, list[dict], list[tuple[str, str]]]


@dataclass
class IngestReport:
    directory: str  # the folder or shard pattern ingested
    found: int  # image files (folder) or samples (shards) seen
    loaded: int
    skipped: int
    bad_paths: list[str] = field(default_factory=list)  # the first MAX_BAD_PATHS, with their reason
    reasons: dict[str, int] = field(default_factory=dict)  # skipped count per reason
    seconds: float = 0.0
    workers: int = 1

    @property
    def images_per_second(self) -> float:
        return self.loaded / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        text = (f"{self.directory}: {self.loaded} of {self.found} images loaded in {self.seconds:.1f} s "
                f"({self.images_per_second:.0f} images/s, {self.workers} worker{'s' * (self.workers > 1)})")
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
            text += f"; skipped {self.skipped} ({reasons}; first: {', '.join(self.bad_paths)})"
        return text


def _image_files(directory: Path) -> list[Path]:
    # Sorted so the pool's order, and so any seeded run over it, is the same on every machine.
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _side_files(path: Path) -> dict:
    """img2dataset's "files" format keeps 000042.json / 000042.txt beside 000042.jpg."""
    side: dict = {}
    for suffix in (".json", ".txt"):
        sibling = path.with_suffix(suffix)
        if sibling.is_file():
            text = sibling.read_text(errors="replace")
            try:
                side[suffix[1:]] = json.loads(text) if suffix == ".json" else text
            except ValueError:
                side["json_unreadable"] = True
    return side


def decode_files(paths: list[str], size: int, channels: int) -> Decoded:
    """One folder task: decode ``paths`` in order (runs in a worker process)."""
    images, metadata, bad = [], [], []
    for path in paths:
        image, reason = read_and_decode(path, size, channels)
        if image is None:
            bad.append((path, reason or "corrupt image"))
            continue
        images.append(image)
        metadata.append({"key": Path(path).stem, "file": path, **_side_files(Path(path))})
    stacked = np.stack(images) if images else np.empty((0, channels, size, size), dtype=np.uint8)
    return stacked, metadata, bad


def _in_order(work: Callable[[object], Decoded], tasks: list, workers: int) -> Iterator[Decoded]:
    """Results of ``work`` over ``tasks`` in task order, at most 2 × workers tasks in flight."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(work, tasks)
        return
    # fork: workers inherit the imported modules and start at once; they run only numpy/Pillow.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(workers) as pool:
        pending, upcoming = [], iter(tasks)
        for task in upcoming:
            pending.append(pool.apply_async(work, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).get()
        for result in pending:
            yield result.get()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Sink:
    """Where decoded chunks go: a growing list (in-memory pool) or an images file on disk, whose
    failed writes are ``WriteFailed`` saying ``kept``."""

    def __init__(self, out: Path | None, row_shape: tuple[int, int, int], kept: str = ""):
        self.directory = out if out is not None and out.suffix != ".npz" else None
        self.kept = kept
        self.writer = None
        if self.directory is not None:
            with faults.writing(self.directory / IMAGES_FILE, kept):
                self.writer = ImageWriter(self.directory / IMAGES_FILE, row_shape)
        self.parts: list[np.ndarray] = []
        self.metadata: list[dict] = []
        self.count = 0

    def add(self, images: np.ndarray, metadata: list[dict]) -> None:
        if self.writer is not None:
            with faults.writing(self.writer.path, self.kept):
                self.writer.write(images)
        else:
            self.parts.append(images)
        self.metadata += metadata
        self.count += len(images)

    def images(self):
        if self.writer is not None:
            with faults.writing(self.writer.path, self.kept):
                return DiskImages(self.writer.close())
        return torch.from_numpy(np.concatenate(self.parts))

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def check_out(out: Path) -> str:
    """Refuse an ``out`` that holds what kd3 did not write (``is_pool``: a pool directory's meta.json
    records kd3's digest), remove the temp files a killed ingest left there, and say what a failed
    write will leave (for the ``WriteFailed`` line)."""
    if out.suffix == ".npz":
        if out.exists() and not is_pool(out):
            raise ValueError(f"--out {out} exists and is not a kd3 pool .npz; kd3 data ingest writes a new file or "
                             "over a pool it wrote: give another --out")
        remove_stale_temps(out.parent, [out.name])
        return f"the previous {out} is unchanged" if out.exists() else "no partial file is left"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a pool directory: give a new directory, or a .npz path")
    names = (*POOL_FILES, SIDECAR_FILE)
    if not out.is_dir():
        return "no partial file is left"
    others = sorted(entry.name for entry in out.iterdir() if not is_temp_of(entry, names))
    if others and not is_pool(out):
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        why = "its meta.json is not one kd3 wrote" if (out / META_FILE).exists() else "it has no kd3 meta.json"
        raise ValueError(f"--out {out} is not a kd3 pool directory ({why}; it holds {shown}): kd3 data ingest writes only "
                         "into a new or empty directory or over a pool it wrote; give another --out")
    remove_stale_temps(out, names)
    return f"the pool already in {out} is unchanged" if others else "no partial file is left"


def check_geometry(size: int, channels: int) -> None:
    """What every decode needs: 1 (grey) or 3 (RGB) channels and a positive side length."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")


def decode_paths(files: list[str], size: int, channels: int, workers: int = 0, show_progress: bool = False,
                 desc: str = "decode") -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``files`` decoded in order by ingest's workers (``workers`` as in ``ingest``): the uint8
    N×channels×size×size images of the readable ones, and (path, reason) for each one skipped."""
    check_geometry(size, channels)
    workers = workers or default_workers()
    tasks = [files[i:i + FOLDER_TASK] for i in range(0, len(files), FOLDER_TASK)]
    work = partial(decode_files, size=size, channels=channels)
    parts: list[np.ndarray] = [np.empty((0, channels, size, size), dtype=np.uint8)]
    bad: list[tuple[str, str]] = []
    for images, _, skipped in progress(_in_order(work, tasks, workers), desc=f"{desc} ({workers} workers)",
                                       enabled=show_progress, total=len(tasks), unit="task"):
        parts.append(images)
        bad += skipped
    return np.concatenate(parts), bad


def source_path(record: dict) -> str:
    """Where an ingested image came from, absolute: its file, or ``shard.tar:member`` for a tar shard."""
    if "shard" in record:
        return f"{os.path.abspath(record['shard'])}:{record['member']}"
    return os.path.abspath(record["file"])


def ingest(source: str | os.PathLike, size: int, channels: int, out: str | os.PathLike | None = None,
           workers: int = 0, show_progress: bool = False) -> tuple[Pool, IngestReport]:
    """Every readable image of ``source`` (a folder, recursively, or a tar-shard pattern) as uint8
    N×channels×size×size.

    ``out``: None or a ``.npz`` path keeps the pool in memory (and saves the ``.npz``); any other
    path becomes a pool directory written incrementally. ``workers``: decoding processes (0: one
    per available core; 1: decode in this process). Provenance is unknown: ``meta['provenance']``
    is False; ``pool.paths`` holds each image's source (``source_path``). Raises ``FileNotFoundError``
    for a missing folder or shard and ``ValueError`` when nothing decodes.
    """
    check_geometry(size, channels)
    spec = str(source)
    workers = workers or default_workers()
    if is_shard_spec(spec):
        tasks: list = [str(p) for p in expand_shards(spec)]
        work: Callable = partial(decode_shard, size=size, channels=channels)
        kind, unit = {"shards": spec}, "shard"
    else:
        root = Path(spec).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory "
                                    "(or give tar shards: DIR/{00000..00099}.tar)")
        files = [str(p) for p in _image_files(root)]
        tasks = [files[i:i + FOLDER_TASK] for i in range(0, len(files), FOLDER_TASK)]
        work = partial(decode_files, size=size, channels=channels)
        kind, unit, spec = {"directory": str(root)}, "task", str(root)
    out_path = Path(out) if out is not None else None
    kept = check_out(out_path) if out_path is not None else ""
    sink = _Sink(out_path, (channels, size, size), kept)
    reasons: Counter[str] = Counter()
    bad_paths: list[str] = []
    started = time.perf_counter()
    try:
        bar = progress(_in_order(work, tasks, workers), desc=f"ingest ({workers} workers)", enabled=show_progress,
                       total=len(tasks), unit=unit)
        for images, metadata, bad in bar:
            sink.add(images, metadata)
            reasons.update(reason for _, reason in bad)
            bad_paths += [f"{path} ({reason})" for path, reason in bad[:MAX_BAD_PATHS - len(bad_paths)]]
            bar.set_postfix(images=sink.count)
        skipped = sum(reasons.values())
        if not sink.count:
            raise ValueError(f"no readable image in {spec}: {skipped} skipped "
                             f"({', '.join(f'{n} {r}' for r, n in sorted(reasons.items())) or 'no image files'}; "
                             f"extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        images = sink.images()
    except BaseException:
        sink.abort()
        raise
    report = IngestReport(directory=spec, found=sink.count + skipped, loaded=sink.count, skipped=skipped,
                          bad_paths=bad_paths, reasons=dict(reasons), seconds=time.perf_counter() - started,
                          workers=workers)
    meta = {**kind, "size": size, "channels": channels, "image_shape": [channels, size, size],
            "counts": {"found": report.found, "loaded": report.loaded, "skipped": skipped, "reasons": dict(reasons)}}
    pool = Pool.unlabelled(images, origin=ORIGIN, meta=meta, paths=np.array([source_path(m) for m in sink.metadata]))
    if sink.directory is not None:
        with faults.writing(sink.directory, f"{sink.directory} holds the new images but not all their arrays: "
                                            "ingest again once it can be written"):
            write_pool_arrays(sink.directory, pool._provenance_arrays(), pool.meta)
            _write_sidecar(sink.directory / SIDECAR_FILE, sink.metadata)
        pool = Pool.load(sink.directory)
    elif out_path is not None:
        with faults.writing(out_path, kept):
            pool.save(out_path)
    return pool, report


def _write_sidecar(path: Path, metadata: list[dict]) -> None:
    atomic_write(path, lambda f: f.writelines((json.dumps(record, sort_keys=True) + "\n").encode() for record in metadata))


def ingest_folder(directory: str | os.PathLike, size: int, channels: int,
                  workers: int = 1) -> tuple[Pool, IngestReport]:
    """Every readable image under ``directory`` (recursively), in memory: ``ingest`` without ``out``."""
    return ingest(directory, size, channels, workers=workers)
