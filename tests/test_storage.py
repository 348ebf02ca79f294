"""Pools on disk: ``DiskImages`` reads what an in-memory tensor would give, pool directories round-trip
with the same digest as the in-memory pool, subsets stay lazy, and damaged files are refused."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from kd3.data.pool import Pool
from kd3.data.storage import DiskImages, ImageWriter, take


@pytest.fixture
def images():
    return torch.randint(0, 256, (50, 3, 4, 5), generator=torch.Generator().manual_seed(0)).to(torch.uint8)


@pytest.fixture
def stored(images, tmp_path):
    writer = ImageWriter(tmp_path / "images.npy", (3, 4, 5))
    writer.write(images[:17])  # chunks of different sizes, tensor and numpy
    writer.write(images[17:].numpy())
    return DiskImages(writer.close())


def test_written_file_is_a_plain_npy(images, stored, tmp_path):
    assert np.array_equal(np.load(tmp_path / "images.npy"), images.numpy())
    assert np.load(tmp_path / "images.npy", mmap_mode="r").shape == (50, 3, 4, 5)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("key", [slice(3, 11), slice(None), slice(40, 99), slice(0, 0), slice(2, 20, 3)])
def test_slices_read_what_the_tensor_holds(images, stored, key):
    assert torch.equal(stored[key], images[key])


def test_index_arrays_masks_and_ints(images, stored):
    order = torch.tensor([9, 3, 49, 3, 0])
    assert torch.equal(stored[order], images[order])
    assert torch.equal(stored[order.numpy()], images[order])
    mask = np.zeros(50, dtype=bool)
    mask[[1, 7, 8]] = True
    assert torch.equal(stored[mask], images[torch.from_numpy(mask)])
    assert torch.equal(stored[-1], images[-1]) and torch.equal(stored[np.int64(4)], images[4])
    assert stored.shape == images.shape and len(stored) == 50 and stored.dtype == torch.uint8
    with pytest.raises(IndexError):
        stored[torch.tensor([50])]


def test_take_is_a_lazy_view_and_composes(images, stored):
    view = take(stored, np.array([10, 20, 30, 40]))
    assert isinstance(view, DiskImages) and view.shape == (4, 3, 4, 5)
    assert torch.equal(view[1:3], images[[20, 30]])
    inner = view.take(torch.tensor([3, 0]))
    assert torch.equal(inner[:], images[[40, 10]])
    assert torch.equal(take(images, np.array([2, 1])), images[[2, 1]])  # a tensor is just indexed


def test_pickles_and_reads_in_a_forked_child(images, stored):
    clone = pickle.loads(pickle.dumps(stored))
    assert torch.equal(clone[5:9], images[5:9])
    stored[0:1]  # the parent opened its descriptor
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must open its own descriptor, not reuse the parent's
        os.write(write, stored[torch.tensor([7, 2])].numpy().tobytes())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1 << 16) == images[[7, 2]].numpy().tobytes()


def test_truncated_or_wrong_files_are_refused(images, stored, tmp_path):
    data = (tmp_path / "images.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="cut.npy is truncated"):
        DiskImages(tmp_path / "cut.npy")
    np.save(tmp_path / "floats.npy", np.zeros((2, 1, 3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        DiskImages(tmp_path / "floats.npy")


def test_aborted_writer_leaves_nothing(tmp_path):
    writer = ImageWriter(tmp_path / "images.npy", (1, 2, 2))
    writer.write(np.zeros((3, 1, 2, 2), dtype=np.uint8))
    writer.abort()
    assert not list(tmp_path.iterdir())


def _pool(images: torch.Tensor) -> Pool:
    n = len(images)
    return Pool(images=images, source=np.array(["a", "bb"] * (n // 2)), style=np.full(n, "none"),
                relevant=np.arange(n) % 3 == 0, true_label=np.arange(n) % 5, meta={"pool": "test"})


def test_pool_directory_round_trip_and_digest(images, tmp_path):
    memory = _pool(images)
    memory.save(tmp_path / "pool")
    loaded = Pool.load(tmp_path / "pool")
    assert loaded.on_disk and not memory.on_disk
    assert loaded.digest() == memory.digest()  # same bytes, whatever the storage
    assert loaded.meta["digest"] == memory.digest()  # recorded at write time
    for name in ("source", "style", "relevant", "true_label"):
        assert np.array_equal(getattr(loaded, name), getattr(memory, name))
    assert torch.equal(loaded.images[:], images)
    subset = loaded.subset([4, 1, 33])
    assert subset.on_disk and subset.images.rows is not None  # lazy
    assert subset.digest() == memory.subset([4, 1, 33]).digest()
    loaded.save(tmp_path / "copy.npz")  # a disk pool saves to an .npz too
    assert Pool.load(tmp_path / "copy.npz").digest() == memory.digest()


def test_recorded_digest_is_not_trusted_after_the_images_change(images, tmp_path):
    _pool(images).save(tmp_path / "pool")
    path = tmp_path / "pool" / "images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))  # a different mtime, as any rewrite gives
    changed = images.clone()
    changed.view(-1)[-1] ^= 0xFF
    assert Pool.load(tmp_path / "pool").digest() == _pool(changed).digest() != _pool(images).digest()


def test_incomplete_pool_directory_names_what_is_missing(images, tmp_path):
    _pool(images).save(tmp_path / "pool")
    (tmp_path / "pool" / "style.npy").unlink()
    with pytest.raises(FileNotFoundError, match="style.npy"):
        Pool.load(tmp_path / "pool")
