"""Pool images that live on disk: a uint8 ``.npy`` file read by index, never loaded whole.

A web crawl of a million 32×32×3 images is 3 GB of pixels. ``DiskImages`` behaves like the
uint8 N×C×H×W tensor of an in-memory pool for everything kd3 does with pool images (``len``,
``shape``, slices and index arrays that return uint8 tensors) but reads only the rows asked for.
It reads with ``os.pread`` rather than a memory map on purpose: the rows of a memory map a pass
has touched count towards the process's resident memory until the kernel drops them, so one
pass over a 3 GB map shows up as 3 GB of RSS; ``pread`` goes through the page cache instead,
which the kernel shares and reclaims freely.

``ImageWriter`` writes such a file in chunks (bounded memory), for ingest and big pool builds.
Every pool file is written under ``temp_name`` and renamed when whole; ``remove_stale_temps``
clears the temp files a killed writer left behind.
"""
from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import torch

IMAGES_FILE = "images.npy"
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")  # what temp_name writes


def temp_name(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.NAME.<pid>.tmp`` beside it, so
    two writers never share one, and a temp file whose process is gone is known to be stale."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def is_temp_of(entry: Path, names: Collection[str]) -> bool:
    """Whether ``entry`` is a ``temp_name`` of one of the file ``names``."""
    found = _TEMP.fullmatch(entry.name)
    return found is not None and found["name"] in names


def remove_stale_temps(directory: Path, names: Collection[str]) -> list[Path]:
    """Delete the ``temp_name`` files of ``names`` in ``directory`` whose writing process no longer
    runs (a killed ingest or pool build); a live writer's temp files, and any other file, are left
    alone. Returns those removed."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        found = _TEMP.fullmatch(entry.name)
        if (found is None or found["name"] not in names or int(found["pid"]) <= 0 or _process_alive(int(found["pid"]))
                or not entry.is_file()):
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` v1 header of a C-ordered uint8 array of ``shape`` (what ``np.save`` writes)."""
    from io import BytesIO

    buffer = BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


class DiskImages:
    """Read-only uint8 N×C×H×W images in a ``.npy`` file, optionally seen through a row index.

    ``images[a:b]``, ``images[index_tensor]`` and ``images[i]`` return uint8 torch tensors, as
    indexing an in-memory pool's tensor does; ``take`` gives a lazy view of some rows.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, path: str | os.PathLike, rows: np.ndarray | None = None):
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
            except ValueError as error:  # numpy: no magic string, or a header that is no array description
                raise ValueError(f"{self.path} is not a kd3 pool images file (a uint8 .npy written by kd3 data ingest): "
                                 f"{(str(error).split(';')[0].splitlines() or [type(error).__name__])[0][:120]}") from None
            self.offset = f.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ValueError(f"{self.path}: pool images must be a C-ordered uint8 N×C×H×W array, "
                             f"got {dtype} {shape}{' (Fortran order)' if fortran else ''}")
        self.stored = int(shape[0])
        self.row_shape = tuple(int(s) for s in shape[1:])
        self.row_bytes = int(np.prod(self.row_shape))
        expected = self.offset + self.stored * self.row_bytes
        if self.path.stat().st_size < expected:
            raise ValueError(f"{self.path} is truncated: {self.path.stat().st_size} bytes, its header "
                             f"promises {expected}; ingest or build the pool again")
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    # -- the tensor-like surface ----------------------------------------------------------------
    def __len__(self) -> int:
        return self.stored if self.rows is None else len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1 and self.rows is None:
                return self._read_range(start, max(stop, start))
            key = np.arange(start, stop, step)
        if isinstance(key, (int, np.integer)):
            return self[np.array([int(key)])][0]
        positions = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        positions = positions.astype(np.int64).reshape(-1)
        if len(positions) and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} pool images")
        positions = positions % max(len(self), 1)
        return self._read_rows(positions if self.rows is None else self.rows[positions])

    def take(self, positions: np.ndarray | torch.Tensor) -> DiskImages:
        """A lazy view of the rows at ``positions`` (no pixels read)."""
        positions = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions, dtype=np.int64)
        return DiskImages(self.path, positions if self.rows is None else self.rows[positions])

    def numpy(self) -> np.ndarray:
        """Every image in memory; only for pools known to be small (grids, tests)."""
        return self[:].numpy()

    # -- reads ----------------------------------------------------------------------------------
    def _file(self) -> int:
        # One descriptor per process: a forked DataLoader worker must not share the parent's offset.
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read_range(self, start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start, *self.row_shape), dtype=torch.uint8)
        if len(out):  # straight into the tensor: no intermediate bytes objects to fragment the heap
            wanted = out.numel()
            if os.preadv(self._file(), [out.numpy().reshape(-1)], self.offset + start * self.row_bytes) != wanted:
                raise OSError(f"{self.path}: short read at row {start}; was the file truncated while in use?")
        return out

    def _read_rows(self, rows: np.ndarray) -> torch.Tensor:
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        fd, size, offset = self._file(), self.row_bytes, self.offset
        for i, row in enumerate(rows.tolist()):
            out[i] = np.frombuffer(os.pread(fd, size, offset + row * size), dtype=np.uint8)
        return torch.from_numpy(out.reshape(len(rows), *self.row_shape))

    def __del__(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_fd_pid": None}


PoolImages = torch.Tensor | DiskImages


def take(images: PoolImages, positions: np.ndarray | torch.Tensor) -> PoolImages:
    """``images`` restricted to ``positions``: a copy for a tensor, a lazy view for disk images."""
    if isinstance(images, DiskImages):
        return images.take(positions)
    return images[torch.as_tensor(np.asarray(positions), dtype=torch.long)]


def chunks(images: PoolImages, size: int) -> Iterator[torch.Tensor]:
    """The images in order, ``size`` at a time (what every whole-pool pass reads)."""
    for start in range(0, len(images), size):
        yield images[start:start + size]


class ImageWriter:
    """Append uint8 C×H×W images to ``path`` (a ``.npy``) chunk by chunk; ``close`` fixes the header.

    The file is written under a temporary name and renamed on ``close``, so a crash never leaves a
    pool file that looks complete.
    """

    def __init__(self, path: str | os.PathLike, row_shape: tuple[int, int, int]):
        self.path = Path(path)
        self.row_shape = tuple(row_shape)
        self.count = 0
        self.tmp = temp_name(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")
        # The count is unknown until the end: reserve a header as long as the biggest one can be.
        self.header_size = len(_npy_header((2**62, *self.row_shape)))
        try:
            self.file.write(b"\0" * self.header_size)
        except BaseException:  # a full disk already: no temp file may outlive this writer
            self.abort()
            raise

    def write(self, images: np.ndarray | torch.Tensor) -> None:
        array = np.ascontiguousarray(images.numpy() if isinstance(images, torch.Tensor) else images, dtype=np.uint8)
        if array.shape[1:] != self.row_shape:
            raise ValueError(f"images of shape {array.shape[1:]} written to a pool of {self.row_shape}")
        self.file.write(array.tobytes())
        self.count += len(array)

    def close(self) -> Path:
        header = _npy_header((self.count, *self.row_shape))
        # Pad the real header (its dict ends in spaces and a newline) to the reserved size.
        header = header[:-1].ljust(self.header_size - 1, b" ") + b"\n"
        header = header[:8] + (self.header_size - 10).to_bytes(2, "little") + header[10:]
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
