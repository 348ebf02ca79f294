"""Teacher outputs on K fixed views per pool image, kept on disk and read by (image, view).

A cache of teacher outputs grows with the pool: KD³'s fp16 feature maps of LeNet-5 on 8 views are
6.7 KB per image, 1.3 GB at 200k images, and it used to be held in RAM by every process. Here each
cached quantity is one flat file of N × K rows, written once per run by a streamed pass and read back
a batch of rows at a time, so what a process holds is O(batch).

- **Where**: an unnamed file in ``<kd3 cache>/teacher-views/``. Rank 0 creates it at its full size
  (``posix_fallocate``: a full disk fails here, before the pass, not halfway through), every rank opens
  it, then rank 0 unlinks the name: the space comes back when the last process closes it, however the
  run ends (killed included), and nothing is left to clean up. It is not kept across runs on purpose:
  the values depend on the batch boundaries of the pass (the world size), the device and the thread
  count, so a file reused by a later run could differ in the last bit from what that run computes,
  and at a million images it is gigabytes. A file a run killed between create and unlink leaves is
  removed by the next run (its name carries the dead process's PID).
- **Ranks**: each rank computes its own contiguous shard (``distributed.shard_bounds``, the same
  batches as ``map_rows``) and writes it straight into the shared file at its rows; there is no
  all-gather. Every rank then reads the whole file.
- **Reads**: ``os.preadv`` of each wanted (image, view) row into the output tensor, not a memory map,
  for the reason ``kd3.data.storage.DiskImages`` gives: the pages of a map a run has touched count
  towards its resident memory (an epoch touches them all), while ``pread`` goes through the page
  cache, which the kernel shares between the ranks and reclaims freely.

The bytes read back are the bytes computed, so training is bit-identical to a cache held in RAM.
"""
from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from kd3.data.storage import remove_stale_temps, temp_name
from kd3.engine import distributed

CACHE_FOLDER = "teacher-views"
_MAX_FILES = 8  # quantities one cache may hold: views-0.bin .. views-7.bin, as temp_name(...) files, then unlinked


class ViewStore:
    """N × K rows of one shape and dtype in an open (unlinked) file; ``read`` returns a tensor."""

    def __init__(self, fd: int, num_rows: int, num_views: int, row_shape: tuple[int, ...], dtype: torch.dtype):
        self._fd: int | None = fd  # pread/pwrite take offsets, so a forked child may share it
        self.num_rows, self.num_views = num_rows, num_views
        self.row_shape, self.dtype = tuple(row_shape), dtype
        self.row_bytes = math.prod(self.row_shape) * torch.empty((), dtype=dtype).element_size()

    @property
    def shape(self) -> torch.Size:
        """(N, K, *row_shape), as the tensor the file stands for would have."""
        return torch.Size((self.num_rows, self.num_views, *self.row_shape))

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.num_views * self.row_bytes

    def write(self, start: int, values: torch.Tensor) -> None:
        """Rows ``start ..`` (values: rows × K × row_shape, this store's dtype) into the file."""
        data = _bytes(values)
        written = os.pwrite(self._file(), data, start * self.num_views * self.row_bytes)
        if written != len(data):
            raise OSError(f"kd3 teacher view cache: short write at row {start} (disk full?)")

    def read(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """len(rows) × row_shape: view ``views[i]`` of row ``rows[i]`` (both int tensors on any device)."""
        out = torch.empty((len(rows), *self.row_shape), dtype=self.dtype)
        target = out.view(torch.uint8).numpy().reshape(len(rows), self.row_bytes) if len(rows) else None
        fd, size = self._file(), self.row_bytes
        for i, (row, view) in enumerate(zip(rows.tolist(), views.tolist())):
            if not (0 <= row < self.num_rows and 0 <= view < self.num_views):
                raise IndexError(f"(row {row}, view {view}) outside the cache's {self.num_rows} × {self.num_views}")
            if os.preadv(fd, [target[i]], (row * self.num_views + view) * size) != size:
                raise OSError(f"kd3 teacher view cache: short read at row {row}")
        return out

    def _file(self) -> int:
        if self._fd is None:
            raise RuntimeError("the teacher view cache was closed")
        return self._fd

    def close(self) -> None:
        """Close the file (its space is freed once no process has it open)."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.close()

    def __reduce__(self):
        # The file has no name left to reopen: a copy in another process could not read it.
        raise TypeError("a teacher view cache (an open, unlinked file) cannot be pickled or copied")


def _bytes(values: torch.Tensor) -> np.ndarray:
    """The tensor's bytes in C order, without a copy when it is already contiguous on the CPU."""
    return values.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot reserve space
            raise
        os.ftruncate(fd, size)


def _names(count: int) -> list[str]:
    return [f"views-{k}.bin" for k in range(count)]


def _create(folder: Path, sizes: Sequence[int]) -> tuple[list[str], str]:
    """Rank 0: one file per size, allocated in full; (their paths, "") or ([], why not)."""
    paths: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder, _names(_MAX_FILES))
        for name, size in zip(_names(len(sizes)), sizes):
            path = temp_name(folder / name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            paths.append(str(path))
            try:
                if size:
                    _allocate(fd, size)
            finally:
                os.close(fd)
    except OSError as error:
        for path in paths:
            Path(path).unlink(missing_ok=True)
        hint = "free disk space there, point KD3_CACHE elsewhere, or set method.teacher_views: 0 (teacher every step)"
        if error.errno == errno.ENOSPC:
            return [], f"kd3 teacher view cache: {folder} has no room for {sum(sizes) / 1e9:.2f} GB; {hint}"
        return [], f"kd3 teacher view cache: cannot write in {folder} ({error.strerror}); {hint}"
    return paths, ""


def build_view_cache(num_rows: int, num_views: int, batch_size: int, cache_dir: Path,
                     compute: Callable[[int, int], Sequence[torch.Tensor]],
                     batches: Callable[[range], Iterator[int]] | None = None) -> list[ViewStore]:
    """Run ``compute(start, stop)`` over rows [0, num_rows) in batches into on-disk stores (``ViewStore``).

    ``compute`` returns tensors of ``stop - start`` × ``num_views`` × (a fixed row shape), one per
    cached quantity, in the dtype to store. Under torchrun each rank computes its own shard (the
    batches ``distributed.map_rows`` would run) and writes it into the files all ranks share; every
    rank returns stores over all rows. ``batches`` may wrap the batch starts (a progress bar).
    """
    if num_rows == 0:
        raise ValueError("no rows to cache")
    # Shapes and dtypes from a one-row probe (the teacher is frozen and the views are fixed, so
    # this draws no random numbers and changes nothing); every rank needs them, even one with no rows.
    probe = [(tuple(t.shape[2:]), t.dtype) for t in compute(0, 1)]
    if len(probe) > _MAX_FILES:
        raise ValueError(f"at most {_MAX_FILES} cached quantities, got {len(probe)}")
    sizes = [num_rows * num_views * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
             for shape, dtype in probe]
    folder = Path(cache_dir) / CACHE_FOLDER
    paths, failure = distributed.broadcast_object(_create(folder, sizes) if distributed.is_main() else None)
    if failure:  # rank 0 could not create them: every rank stops with its message
        raise OSError(failure)
    try:
        fds = [os.open(path, os.O_RDWR) for path in paths]
    finally:
        distributed.barrier()  # every rank holds its descriptors (or failed) before the names go
        if distributed.is_main():
            for path in paths:
                Path(path).unlink(missing_ok=True)
    stores = [ViewStore(fd, num_rows, num_views, shape, dtype) for fd, (shape, dtype) in zip(fds, probe)]
    start, stop = distributed.shard_bounds(num_rows)
    starts = range(start, stop, batch_size)
    for begin in (batches(starts) if batches else starts):
        for store, values in zip(stores, compute(begin, min(begin + batch_size, stop))):
            store.write(begin, values)
    distributed.barrier()  # every shard is in the files before any rank reads them
    return stores
