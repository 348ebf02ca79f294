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

import io
import json
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from kd3.data.decode import CONVERSIONS, DEFAULT_ALPHA, check_alpha, read_and_decode
from kd3.data.pool import META_FILE, PATHS, POOL_FILES, Pool, is_pool, write_paths, write_pool_arrays
from kd3.data.shards import decode_shard, find_shards, is_shard_spec, shard_pattern
from kd3.data.storage import IMAGES_FILE, DiskImages, ImageWriter, is_temp_of, remove_stale_temps, temp_name
from kd3.engine import faults, signals
from kd3.engine.signals import HANDLED
from kd3.utils.progress import progress

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm"})
MAX_BAD_PATHS = 10  # how many unreadable files the report names; the counts cover them all
FOLDER_TASK = 512  # files per worker task: big enough to amortise the round trip
ORIGIN = "ingested"  # the source of every ingested image, folder or shards alike
SIDECAR_FILE = "sidecar.jsonl"  # per-image metadata from img2dataset's json/txt members
PATHS_CHUNK = 65536  # source paths turned into one fixed-width array at a time when the pool is written
PATHS_READ = 1 << 20  # bytes of the paths file read back at a time

# A worker's answer for one task: images, their side records, (where, reason) per skip, conversions made.
Decoded = tuple[np.ndarray, list[dict], list[tuple[str, str]], Counter[str]]


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
    conversions: dict[str, int] = field(default_factory=dict)  # loaded images per conversion (kd3.data.decode.CONVERSIONS)
    alpha: str = DEFAULT_ALPHA  # the background transparent pixels were composited onto
    missing_shards: int = 0  # shards the pattern names that did not exist, skipped (allow_missing)

    @property
    def images_per_second(self) -> float:
        return self.loaded / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        text = (f"{self.directory}: {self.loaded} of {self.found} images loaded in {self.seconds:.1f} s "
                f"({self.images_per_second:.0f} images/s, {self.workers} worker{'s' * (self.workers > 1)})")
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
            text += f"; skipped {self.skipped} ({reasons}; first: {', '.join(self.bad_paths)})"
        if self.conversions:
            text += f"; converted: {self.conversion_summary()}"
        if self.missing_shards:
            text += f"; {self.missing_shards} missing shard{'s' * (self.missing_shards > 1)} skipped"
        return text

    def conversion_summary(self) -> str:
        """``"3 16-bit scaled, 5 alpha composited (on white), ..."`` in ``CONVERSIONS`` order; "none" when none."""
        parts = [f"{self.conversions[name]} {name}{f' (on {self.alpha})' * (name == 'alpha composited')}"
                 for name in CONVERSIONS if self.conversions.get(name)]
        return ", ".join(parts) or "none"


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


def decode_files(paths: list[str], size: int, channels: int, alpha: str = DEFAULT_ALPHA) -> Decoded:
    """One folder task: decode ``paths`` in order (runs in a worker process); ``alpha``: the
    background transparent pixels are composited onto."""
    images, metadata, bad = [], [], []
    conversions: Counter[str] = Counter()
    for path in paths:
        image, reason = read_and_decode(path, size, channels, alpha, conversions)
        if image is None:
            bad.append((path, reason or "corrupt image"))
            continue
        images.append(image)
        metadata.append({"key": Path(path).stem, "file": path, **_side_files(Path(path))})
    stacked = np.stack(images) if images else np.empty((0, channels, size, size), dtype=np.uint8)
    return stacked, metadata, bad, conversions


# Worker processes: each is handed the whole task list at start (fork shares it; nothing is pickled per task),
# then task indices, one small message each, over its own pipe: task i goes to worker i % workers. With no
# queue shared between workers there is no lock a killed worker can leave held (what made Pool.terminate()
# hang), a worker that dies is seen at once (its pipe closes) instead of its task being waited on forever,
# and the parent never blocks sending: a worker has at most two indices outstanding.
STOP_SECONDS = 5.0  # how long workers get to exit, at each step of stopping them, before the next, harsher one


def _detach_from_parent(parent: int) -> None:
    """First thing in a worker: the parent's Python signal handlers (the CLI's, which raise ``Interrupted``)
    do not apply here. SIGTERM (what stopping a worker sends) ends it at once, with no traceback; SIGINT is
    ignored, since a Ctrl-C reaches the whole foreground process group and the parent decides for its workers;
    and the worker dies with its parent instead of outliving it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # blocked by the parent around the fork
    if not signals.die_with_parent(signal.SIGKILL, parent):
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """Where the kernel cannot signal a parent's death: exit once the parent has changed (it died)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _worker(work: Callable[[object], Decoded], tasks: list, conn: Connection, parent: int,
            inherited: list[Connection]) -> None:
    """A worker's life: ``work(tasks[i])`` for each index ``i`` the parent sends, until it closes the pipe.
    ``inherited``: the parent's pipe ends a forked worker holds copies of (its own and earlier workers'), closed
    so that each pipe reads as closed when the parent closes it or dies."""
    _detach_from_parent(parent)
    for end in inherited:
        end.close()
    while True:
        try:
            index = conn.recv()
        except EOFError:  # the parent closed its end: no more tasks
            return
        try:
            outcome: tuple[bool, object] = (True, work(tasks[index]))
        except Exception as error:  # raised again in the parent, as multiprocessing.Pool did
            outcome = (False, error)
        try:
            conn.send(outcome)
        except BrokenPipeError:  # the parent is stopping
            return
        except Exception as error:  # an exception that does not pickle: its text
            conn.send((False, RuntimeError(f"{type(outcome[1]).__name__}: {error}")))


def _start_workers(work: Callable[[object], Decoded], tasks: list, workers: int,
                   procs: list[BaseProcess], ends: list[Connection]) -> None:
    """``workers`` worker processes, appended to ``procs`` (with the parent's pipe ends in ``ends``) as each starts."""
    # fork: workers start at once with the imported modules (they run only numpy/Pillow) and share the task list;
    # spawn re-imports kd3 and torch in every worker (10 s against 0.2 s for a 60-image crawl on 2 workers), and a
    # forkserver worker's parent is the server, not this process, so it could not die with it.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # SIGTERM/SIGINT are blocked until each child has reset its handlers: one arriving in between would run the
    # CLI's handler in the child. A signal for the parent waits here and is handled once this returns.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED) if hasattr(signal, "pthread_sigmask") else None
    try:
        for number in range(workers):
            end, child_end = context.Pipe()
            inherited = [*ends, end] if context.get_start_method() == "fork" else []
            proc = context.Process(target=_worker, args=(work, tasks, child_end, os.getpid(), inherited), daemon=True,
                                   name=f"kd3-decode-{number}")
            proc.start()
            child_end.close()  # the parent keeps its own end only, so a dead worker's pipe reads as closed
            procs.append(proc)
            ends.append(end)
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _stop_workers(procs: list[BaseProcess], ends: list[Connection], finished: bool) -> None:
    """Bounded: closed pipes let idle workers exit (``finished``: all work done), then SIGTERM, then SIGKILL."""
    for end in ends:
        end.close()
    for step in ("wait", "terminate", "kill"):
        if step == "wait" and not finished:
            continue
        deadline = time.monotonic() + STOP_SECONDS
        for proc in procs:
            if step != "wait" and proc.is_alive():
                getattr(proc, step)()
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        if not any(proc.is_alive() for proc in procs):
            return


def _received(conn: Connection, proc: BaseProcess) -> Decoded:
    try:
        ok, value = conn.recv()
    except (EOFError, ConnectionError):  # the worker is gone (a reset: it died with data unread)
        proc.join(STOP_SECONDS)
        code = proc.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 and -code in signal.valid_signals()
               else f"exited with code {code}")
        raise faults.Fault(f"a decoding worker process (PID {proc.pid}) {how}, perhaps out of memory: run again, with "
                           "fewer --workers if it recurs") from None
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def _in_order(work: Callable[[object], Decoded], tasks: list, workers: int) -> Iterator[Decoded]:
    """Results of ``work`` over ``tasks`` in task order, at most 2 × workers tasks in flight."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(work, tasks)
        return
    workers = min(workers, len(tasks))
    procs: list[BaseProcess] = []
    ends: list[Connection] = []
    finished = False
    try:
        _start_workers(work, tasks, workers, procs, ends)
        sent = 0
        for index in range(len(tasks)):
            while sent < min(len(tasks), index + 2 * workers):
                ends[sent % workers].send(sent)
                sent += 1
            yield _received(ends[index % workers], procs[index % workers])
        finished = True
    finally:
        with signals.deferred():  # a signal now stops ingest once its workers are gone, not halfway through
            _stop_workers(procs, ends, finished)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Sink:
    """Where decoded chunks go: a growing list (in-memory pool), or an images file and a sidecar
    file on disk (a pool directory), whose failed writes are ``WriteFailed`` saying ``kept``.

    Side records are written to the sidecar file as they arrive, not held: at ten million images
    they would be tens of GB of Python dicts. Each image's source path (the pool's ``paths``) goes
    to a ``_PathStream`` as it arrives, not to a list."""

    def __init__(self, out: Path | None, row_shape: tuple[int, int, int], kept: str = ""):
        self.directory = out if out is not None and out.suffix != ".npz" else None
        self.kept = kept
        self.writer = None
        self.sidecar: _SidecarWriter | None = None
        if self.directory is not None:
            with faults.writing(self.directory / IMAGES_FILE, kept):
                self.writer = ImageWriter(self.directory / IMAGES_FILE, row_shape)
            try:
                with faults.writing(self.directory / SIDECAR_FILE, kept):
                    self.sidecar = _SidecarWriter(self.directory / SIDECAR_FILE)
                with faults.writing(self.directory / f"{PATHS}.npy", kept):
                    # Unnamed (O_TMPFILE where there is one): nothing to clean up after a killed ingest.
                    self.paths = _PathStream(tempfile.TemporaryFile(dir=self.directory))
            except BaseException:
                self.writer.abort()
                if self.sidecar is not None:
                    self.sidecar.abort()
                raise
        else:
            self.paths = _PathStream(io.BytesIO())  # the pool is in memory anyway: a few bytes a path more
        self.parts: list[np.ndarray] = []
        self.count = 0

    def add(self, images: np.ndarray, metadata: list[dict]) -> None:
        if self.writer is not None:
            with faults.writing(self.writer.path, self.kept):
                self.writer.write(images)
        else:
            self.parts.append(images)
        if self.sidecar is not None:
            with faults.writing(self.sidecar.path, self.kept):
                self.sidecar.write(metadata)
        # An in-memory stream cannot fail to write; a file in the pool directory can (a full disk).
        with faults.writing(self.directory / f"{PATHS}.npy", self.kept) if self.directory is not None else nullcontext():
            self.paths.write([source_path(record) for record in metadata])
        self.count += len(images)

    def images(self):
        if self.writer is not None:
            with faults.writing(self.writer.path, self.kept):
                return DiskImages(self.writer.close())
        return torch.from_numpy(np.concatenate(self.parts))

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        if self.sidecar is not None:
            self.sidecar.abort()
        self.paths.close()


class _PathStream:
    """Each image's source path, appended to ``file`` as it is decoded, then read back in order as
    fixed-width ``<U`` arrays of ``PATHS_CHUNK`` (what ``paths.npy`` holds). A Python list of a
    million paths and the ``<U`` array made from it at the end (with its copies) were most of what
    grew with the number of images in the ingest process (issue 24): here memory holds one
    chunk, whatever the count.

    Each path is UTF-8 (``surrogatepass``: any str round-trips) ended by a NUL byte, which no file
    path or tar member name contains. ``width``: the longest path in characters, the array's width."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.count = 0
        self.width = 1  # numpy's narrowest str dtype, what np.array of empty strings gives

    def write(self, paths: list[str]) -> None:
        self.width = max([self.width, *map(len, paths)])
        self.file.write(b"".join(path.encode("utf-8", "surrogatepass") + b"\0" for path in paths))
        self.count += len(paths)

    def chunks(self) -> Iterator[np.ndarray]:
        """Every path in order, as ``<U{width}`` arrays of at most ``PATHS_CHUNK``."""
        self.file.flush()
        self.file.seek(0)
        pending: list[bytes] = []
        tail = b""
        while block := self.file.read(PATHS_READ):
            *whole, tail = (tail + block).split(b"\0")
            pending += whole
            while len(pending) >= PATHS_CHUNK:
                yield self._array(pending[:PATHS_CHUNK])
                del pending[:PATHS_CHUNK]
        if pending:
            yield self._array(pending)

    def _array(self, encoded: list[bytes]) -> np.ndarray:
        return np.array([path.decode("utf-8", "surrogatepass") for path in encoded], dtype=f"<U{self.width}")

    def array(self) -> np.ndarray:
        """Every path in one ``<U{width}`` array (an in-memory pool), filled chunk by chunk."""
        out = np.empty(self.count, dtype=f"<U{self.width}")
        start = 0
        for chunk in self.chunks():
            out[start:start + len(chunk)] = chunk
            start += len(chunk)
        return out

    def close(self) -> None:
        self.file.close()


class _SidecarWriter:
    """``sidecar.jsonl`` written line by line under ``temp_name`` and renamed by ``close``: one JSON
    object per image (sorted keys), in pool order. A failed or abandoned write leaves no temp file."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = temp_name(path)
        self.file = open(self.tmp, "wb")

    def write(self, records: list[dict]) -> None:
        self.file.writelines((json.dumps(record, sort_keys=True) + "\n").encode() for record in records)

    def close(self) -> None:
        """Flush, fsync and rename into place (what ``kd3.data.pool.atomic_write`` does for a whole file)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


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
                 desc: str = "decode", alpha: str = DEFAULT_ALPHA) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``files`` decoded in order by ingest's workers (``workers`` and ``alpha`` as in ``ingest``): the
    uint8 N×channels×size×size images of the readable ones, and (path, reason) for each one skipped."""
    check_geometry(size, channels)
    check_alpha(alpha)
    workers = workers or default_workers()
    tasks = [files[i:i + FOLDER_TASK] for i in range(0, len(files), FOLDER_TASK)]
    work = partial(decode_files, size=size, channels=channels, alpha=alpha)
    parts: list[np.ndarray] = [np.empty((0, channels, size, size), dtype=np.uint8)]
    bad: list[tuple[str, str]] = []
    for images, _, skipped, _ in progress(_in_order(work, tasks, workers), desc=f"{desc} ({workers} workers)",
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
           workers: int = 0, show_progress: bool = False, alpha: str = DEFAULT_ALPHA,
           allow_missing: bool = False) -> tuple[Pool, IngestReport]:
    """Every readable image of ``source`` (a folder, recursively, or a tar-shard pattern) as uint8
    N×channels×size×size.

    ``out``: None or a ``.npz`` path keeps the pool in memory (and saves the ``.npz``); any other
    path becomes a pool directory written incrementally. ``workers``: decoding processes (0: one
    per available core; 1: decode in this process). Provenance is unknown: ``meta['provenance']``
    is False; ``pool.paths`` holds each image's source (``source_path``). ``alpha``: the background
    transparent pixels are composited onto (``kd3.data.decode.ALPHA_BACKGROUNDS``; white, the
    default, is what every kd3 ingest did before the choice existed). What was converted (16-bit
    scaled, alpha composited, ...) is counted in the report and in ``meta['counts']['conversions']``.
    ``allow_missing``: skip the shards a pattern names that do not exist (counted in the report's
    ``missing_shards`` and ``meta['missing_shards']``) instead of refusing.
    Raises ``FileNotFoundError`` for a missing folder or shard and ``ValueError`` when nothing decodes
    (for a folder of tar shards, naming the pattern to give instead).
    """
    check_geometry(size, channels)
    check_alpha(alpha)
    spec = str(source)
    workers = workers or default_workers()
    missing: list[Path] = []
    if is_shard_spec(spec):
        present, missing = find_shards(spec, allow_missing)
        tasks: list = [str(p) for p in present]
        work: Callable = partial(decode_shard, size=size, channels=channels, alpha=alpha)
        kind, unit = {"shards": spec, "missing_shards": len(missing)}, "shard"
    else:
        root = Path(spec).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory "
                                    "(or give tar shards: DIR/{00000..00099}.tar)")
        files = [str(p) for p in _image_files(root)]
        if not files and (pattern := shard_pattern(root)) is not None:
            raise ValueError(f"{root} holds .tar shards but no image files: ingest the shards with '{pattern}' "
                             "(quoted; add --allow-missing if some numbers are absent)")
        tasks = [files[i:i + FOLDER_TASK] for i in range(0, len(files), FOLDER_TASK)]
        work = partial(decode_files, size=size, channels=channels, alpha=alpha)
        kind, unit, spec = {"directory": str(root)}, "task", str(root)
    out_path = Path(out) if out is not None else None
    kept = check_out(out_path) if out_path is not None else ""
    sink = _Sink(out_path, (channels, size, size), kept)
    reasons: Counter[str] = Counter()
    conversions: Counter[str] = Counter()
    bad_paths: list[str] = []
    started = time.perf_counter()
    try:
        bar = progress(_in_order(work, tasks, workers), desc=f"ingest ({workers} workers)", enabled=show_progress,
                       total=len(tasks), unit=unit)
        for images, metadata, bad, converted in bar:
            sink.add(images, metadata)
            reasons.update(reason for _, reason in bad)
            conversions.update(converted)
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
                          workers=workers, conversions={name: conversions[name] for name in CONVERSIONS if conversions[name]},
                          alpha=alpha, missing_shards=len(missing))
    meta = {**kind, "size": size, "channels": channels, "image_shape": [channels, size, size], "alpha": alpha,
            "counts": {"found": report.found, "loaded": report.loaded, "skipped": skipped, "reasons": dict(reasons),
                       "conversions": report.conversions}}
    if sink.directory is not None:
        _write_directory(sink, images, meta)
        return Pool.load(sink.directory), report
    pool = Pool.unlabelled(images, origin=ORIGIN, meta=meta, paths=sink.paths.array())
    sink.paths.close()
    if out_path is not None:
        with faults.writing(out_path, kept):
            pool.save(out_path)
    return pool, report


def _write_directory(sink: _Sink, images: DiskImages, meta: dict) -> None:
    """A pool directory's arrays beside the images ``sink`` wrote: paths.npy streamed from the paths
    file, the provenance arrays, meta.json, then the sidecar renamed into place."""
    with faults.writing(sink.directory, f"{sink.directory} holds the new images but not all their arrays: "
                                        "ingest again once it can be written"):
        try:
            write_paths(sink.directory, sink.paths.chunks(), sink.paths.count, sink.paths.width)
            pool = Pool.unlabelled(images, origin=ORIGIN, meta=meta)
            write_pool_arrays(sink.directory, pool._provenance_arrays(), pool.meta, paths_written=True)
            sink.sidecar.close()
        except BaseException:
            sink.sidecar.abort()
            raise
        finally:
            sink.paths.close()


def ingest_folder(directory: str | os.PathLike, size: int, channels: int,
                  workers: int = 1) -> tuple[Pool, IngestReport]:
    """Every readable image under ``directory`` (recursively), in memory: ``ingest`` without ``out``."""
    return ingest(directory, size, channels, workers=workers)
