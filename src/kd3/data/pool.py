"""The web pool: unlabelled uint8 images plus per-image provenance, in memory or on disk.

Two storages behind one interface: a small pool holds its images in a uint8 tensor and is saved
as a plain ``.npz``; a large one is a directory (``images.npy`` read by index through
``DiskImages``, the provenance arrays as ``.npy`` files and ``meta.json`` beside it) that is
never loaded whole. ``Pool.load`` and ``Pool.save`` pick the storage from the path.

Provenance (source, style, relevant, true_label) exists so benchmarks can score selection
precision / recall; methods must never read it. Pools ingested from a folder have none:
``meta['provenance']`` is False, ``relevant`` is all False and ``true_label`` all -1. They have
``paths`` instead, where each image came from (a file, or ``shard.tar:member``), so a report that
names a pool image can name the file; built pools have none (``paths`` is None).

A pool directory is kd3's when its meta.json is a JSON object holding the ``digest`` and
``digest_of`` that ``write_pool_arrays`` records (``is_pool``): ingest writes over such a
directory, never over one it did not make. A file that is no kd3 pool (another ``.npz``, random
bytes, a truncated download, a FIFO or a device) is refused in one line naming it (``Pool.load``).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kd3.data.storage import IMAGES_FILE, DiskImages, PoolImages, chunks, take, temp_name
from kd3.utils.safe_load import UnsafeFileError, irregular_kind, read_npy, read_npz

UNKNOWN_LABEL = -1
_ARRAYS = ("images", "source", "style", "relevant", "true_label")
META_FILE = "meta.json"
PATHS = "paths"  # the optional array of source paths (``paths`` in a .npz, paths.npy in a directory)
DIGEST_CHUNK = 8192  # images hashed at a time: the digest never needs the whole pool in memory
# The files every pool directory holds (write_pool_arrays, ImageWriter), and those it may hold.
REQUIRED_FILES = (IMAGES_FILE, META_FILE, *(f"{name}.npy" for name in _ARRAYS[1:]))
POOL_FILES = (*REQUIRED_FILES, f"{PATHS}.npy")
NOT_A_POOL = "is not a kd3 pool (an .npz or a directory written by `kd3 data ingest` or `kd3 data build`)"
_NPY_MAGIC = b"\x93NUMPY"


@dataclass
class Pool:
    images: PoolImages  # uint8 N×C×H×W: a tensor, or DiskImages for a pool stored on disk
    source: np.ndarray  # str per image: "fashion-r", "natural", "faces", ..., "folder"
    style: np.ndarray  # str per image: "clean", "sketch", ..., "none" for irrelevant images
    relevant: np.ndarray  # bool per image
    true_label: np.ndarray  # int64 per image, -1 when unknown
    meta: dict = field(default_factory=dict)  # the knobs and counts that built the pool
    # str per image: the file (or shard.tar:member) it was decoded from; None for built pools.
    # Not part of the digest: the same images ingested from a folder or from shards are one pool.
    # A pool directory's is a read-only memory map of paths.npy (``_mapped``).
    paths: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"pool images must be uint8 N×C×H×W, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        for name in _ARRAYS[1:]:
            if len(getattr(self, name)) != n:
                raise ValueError(f"pool field {name} has {len(getattr(self, name))} entries "
                                 f"for {n} images")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"pool paths has {len(self.paths)} entries for {n} images")

    @classmethod
    def unlabelled(cls, images: PoolImages, origin: str, meta: dict | None = None,
                   paths: np.ndarray | None = None) -> Pool:
        """A pool without provenance (a user's folder, a source with its labels dropped);
        ``paths``: where each image came from, when known."""
        n = len(images)
        return cls(images=images, source=np.full(n, origin), style=np.full(n, "none"),
                   relevant=np.zeros(n, dtype=bool), true_label=np.full(n, UNKNOWN_LABEL, dtype=np.int64),
                   meta={"pool": origin, "provenance": False, **(meta or {})}, paths=paths)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.images, DiskImages)

    @property
    def has_provenance(self) -> bool:
        return bool(self.meta.get("provenance", True))

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> Pool:
        """The pool restricted to ``indices`` (in that order); meta notes the parent's size,
        because its counts describe the parent, not the subset. A pool on disk gives a lazy view."""
        idx = np.asarray(indices, dtype=np.int64)
        return Pool(
            images=take(self.images, idx),
            source=self.source[idx], style=self.style[idx], relevant=self.relevant[idx],
            true_label=self.true_label[idx], meta={**self.meta, "subset_of": len(self)},
            paths=None if self.paths is None else self.paths[idx],
        )

    def group_counts(self) -> dict[tuple[str, str], int]:
        """Number of images per (source, style), in sorted order."""
        return dict(sorted(Counter(zip(self.source.tolist(), self.style.tolist())).items()))

    def digest(self) -> str:
        """SHA-256 over images and provenance: equal digests mean byte-identical pools, whatever
        their storage. Hashed in chunks; a stored pool's digest is kept in its meta.json (keyed by
        the images file's size and mtime) so a million-image pool is not re-read on every run."""
        stamp = self._disk_stamp()
        if stamp is not None and self.meta.get("digest_of") == stamp:
            return self.meta["digest"]
        h = hashlib.sha256()
        for chunk in chunks(self.images, DIGEST_CHUNK):
            h.update(np.ascontiguousarray(chunk.numpy()))  # hashed in place: no bytes copy of each chunk
        for name in _ARRAYS[1:]:
            h.update(np.ascontiguousarray(getattr(self, name)))  # the same bytes as .tobytes(), not copied
        return h.hexdigest()

    def _disk_stamp(self) -> list | None:
        """(size, mtime) of a whole stored pool's images file; None in memory or for a view."""
        if not isinstance(self.images, DiskImages) or self.images.rows is not None:
            return None
        stat = self.images.path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` atomically: an ``.npz`` (in-memory pools) or, for any other name, a pool
        directory. A reader never sees half a file when several processes build the same pool."""
        path = Path(path)
        if path.suffix != ".npz":
            return self._save_directory(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A file object stops numpy from appending ".npz".
        atomic_write(path, lambda f: np.savez(f, images=self.images[:].numpy(), **self._provenance_arrays(),
                                               meta=np.array(json.dumps(self.meta, sort_keys=True))))
        return path

    def _provenance_arrays(self) -> dict[str, np.ndarray]:
        """Every per-image array but the images: provenance, and the source paths when known."""
        # Fixed-width unicode arrays load with allow_pickle=False; object arrays would not.
        # copy=False: arrays already of their type are written as they are, not copied first.
        arrays = {"source": self.source.astype(str, copy=False), "style": self.style.astype(str, copy=False),
                  "relevant": self.relevant.astype(bool, copy=False),
                  "true_label": self.true_label.astype(np.int64, copy=False)}
        if self.paths is not None:
            arrays[PATHS] = self.paths.astype(str, copy=False)
        return arrays

    def _save_directory(self, directory: Path) -> Path:
        from kd3.data.storage import ImageWriter

        if not (isinstance(self.images, DiskImages) and self.images.path == directory / IMAGES_FILE
                and self.images.rows is None):
            writer = ImageWriter(directory / IMAGES_FILE, tuple(self.images.shape[1:]))
            for chunk in chunks(self.images, DIGEST_CHUNK):
                writer.write(chunk)
            writer.close()
        write_pool_arrays(directory, self._provenance_arrays(), self.meta)
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike) -> Pool:
        """A pool ``.npz`` (read into memory) or a pool directory (images stay on disk).

        Anything else raises one line naming the file: ``FileNotFoundError`` when it is missing,
        ``ValueError`` for a FIFO or device (refused before it is opened: reading a FIFO would wait
        forever), a file that is no zip, an ``.npz`` without the pool arrays, a damaged one;
        ``kd3.utils.safe_load.UnsafeFileError`` for a pickled array. Nothing in the file is run."""
        path = Path(path)
        if path.is_dir():
            return cls._load_directory(path)
        require_regular_file(path)
        members = _npz_members(path)
        missing = [name for name in (*_ARRAYS, "meta") if name not in members]
        if missing:
            raise ValueError(f"{path} {NOT_A_POOL}: it holds {', '.join(sorted(members)) or 'no arrays'}, "
                             f"not {', '.join(missing)}")
        try:
            z = read_npz(path, "kd3 pool")  # allow_pickle=False, a pickled array refused by name
            return cls(
                images=torch.from_numpy(z["images"]), source=z["source"], style=z["style"],
                relevant=z["relevant"], true_label=z["true_label"],
                meta=_meta_object(json.loads(str(z["meta"]))), paths=z.get(PATHS),
            )
        except UnsafeFileError:
            raise
        except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            # A member cut short or damaged (CRC, zlib), or arrays of the wrong kind.
            raise ValueError(f"{path} {NOT_A_POOL}: {_detail(error)}") from None

    @classmethod
    def _load_directory(cls, directory: Path) -> Pool:
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a complete kd3 pool directory: no regular file {', '.join(missing)} "
                                    "there (write one with `kd3 data ingest ... --out DIR`)")
        arrays = {name: _read_array(directory / f"{name}.npy") for name in _ARRAYS[1:]}
        if (directory / f"{PATHS}.npy").is_file():
            arrays[PATHS] = _read_array(directory / f"{PATHS}.npy", mapped=True)
        meta = read_meta(directory)
        images = DiskImages(directory / IMAGES_FILE)  # a damaged images file names itself
        try:
            return cls(images=images, meta=meta, **arrays)
        except ValueError as error:  # arrays of different lengths: files of two different pools
            raise ValueError(f"{directory} is not a consistent kd3 pool: {_detail(error)}; "
                             "ingest or build it again") from None


def require_regular_file(path: Path) -> None:
    """``path`` exists and is a regular file (or a link to one), checked with ``stat`` before anything opens it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (write a pool with `kd3 data ingest`)") from None
    kind = irregular_kind(mode)
    if kind is not None:
        raise ValueError(f"{path} {NOT_A_POOL}: it is {kind}, not a regular file; nothing was read from it")


def is_pool(path: Path) -> bool:
    """Whether ``path`` holds a pool kd3 wrote: a directory whose meta.json is a JSON object with the
    ``digest`` and ``digest_of`` keys ``write_pool_arrays`` records, or an ``.npz`` with every pool array.
    What ``kd3 data ingest --out`` may write over."""
    try:
        if path.is_dir():
            meta = read_meta(path)
            return "digest" in meta and "digest_of" in meta
        require_regular_file(path)
        return all(name in _npz_members(path) for name in (*_ARRAYS, "meta"))
    except (ValueError, OSError):
        return False


def read_meta(directory: Path) -> dict:
    """A pool directory's meta.json; a damaged one is named in a one-line ``ValueError``."""
    path = directory / META_FILE
    require_regular_file(path)
    try:
        return _meta_object(json.loads(path.read_text()))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, or JSON that is no object
        raise ValueError(f"{path} is not the JSON object kd3 writes ({_detail(error)}); restore it, or write the pool "
                         f"again with `kd3 data ingest SOURCE ... --out {directory}`") from None


def _meta_object(meta: object) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f"pool meta is a JSON {type(meta).__name__}, not an object")
    return meta


def _npz_members(path: Path) -> set[str]:
    """The array names of the ``.npz`` ``path``, from its zip directory alone (no array is read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name.removesuffix(".npy") for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        hint = "; give the pool directory that holds it" if path.suffix == ".npy" else ""
        raise ValueError(f"{path} {NOT_A_POOL}: it is not a zip archive (a truncated download, or another kind "
                         f"of file){hint}") from None


def _read_array(path: Path, mapped: bool = False) -> np.ndarray:
    """One array of a pool directory; a file that is no ``.npy`` named as such (numpy's own words for
    it would suggest allow_pickle, which is the wrong advice for a file kd3 should have written).
    ``mapped``: a read-only memory map instead of a copy in memory (``_mapped``)."""
    require_regular_file(path)
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise ValueError(f"{path} is not a .npy array of a kd3 pool (its first bytes are not numpy's); "
                         "ingest or build the pool again")
    try:
        return _mapped(path) if mapped else read_npy(path, "kd3 pool")
    except UnsafeFileError:
        raise
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npy array of a kd3 pool ({_detail(error)}); "
                         "ingest or build the pool again") from None


def _mapped(path: Path) -> np.ndarray:
    """``path`` memory-mapped read-only: the source paths of a million-image pool are 100-200 MB as a
    ``<U`` array, and a reader (``kd3 data show``, a contamination row) looks at a few of them, so
    only the pages read become resident."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # an object array (which read_npy refuses by name), an empty one (nothing to map), a bad header
        return read_npy(path, "kd3 pool")


def _detail(error: BaseException) -> str:
    """The first line of a loader's error, without numpy's advice to enable allow_pickle."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return "it holds pickled data, which a kd3 pool never holds" if "allow_pickle" in line else line


def write_pool_arrays(directory: Path, arrays: dict[str, np.ndarray], meta: dict, paths_written: bool = False) -> None:
    """The provenance arrays and meta.json of a pool directory (each written atomically), with
    the pool's digest recorded so that later runs need not re-read its images. ``paths_written``:
    paths.npy is already this pool's (``write_paths``, ingest), not in ``arrays``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        atomic_write(directory / f"{name}.npy", lambda f, a=array: np.save(f, a, allow_pickle=False))
    if PATHS not in arrays and not paths_written:  # a pool without paths written over one with them: the old paths are not this pool's
        (directory / f"{PATHS}.npy").unlink(missing_ok=True)
    pool = Pool(images=DiskImages(directory / IMAGES_FILE), meta=dict(meta), **arrays)
    meta = {k: v for k, v in meta.items() if k not in ("digest", "digest_of")}
    meta.update(digest=pool.digest(), digest_of=pool._disk_stamp())
    atomic_write(directory / META_FILE, lambda f: f.write(json.dumps(meta, sort_keys=True, indent=1).encode()))


def write_paths(directory: Path, parts: Iterable[np.ndarray], count: int, width: int) -> None:
    """A pool directory's paths.npy from ``parts``, arrays of ``<U{width}`` source paths, ``count`` in all,
    written as they come (atomically): the same bytes ``np.save`` writes for the whole array, which
    is never in memory at once."""
    dtype = np.dtype(f"<U{width}")

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": (count,)})
        written = 0
        for part in parts:
            f.write(np.ascontiguousarray(part, dtype=dtype).tobytes())
            written += len(part)
        if written != count:  # a header promising rows that are not there would be a corrupt file
            raise ValueError(f"{written} source paths for a paths.npy of {count}")

    atomic_write(directory / f"{PATHS}.npy", write)


def atomic_write(path: Path, write) -> None:
    """Write through a temp file, fsync, rename; a failed write (a full disk) leaves no temp file
    behind and the previous ``path``, if any, untouched."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
