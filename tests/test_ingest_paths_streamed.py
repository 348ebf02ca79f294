"""Ingest streams each image's source path to disk as it is decoded and writes ``paths.npy`` from
that stream (issue 24: a Python list of a million paths and the ``<U`` arrays made from it were
what grew with the number of images in the ingest process). The pool's paths are what they always
were, in pool order, whatever the number of workers, in the same ``paths.npy`` bytes, and a pool
directory's paths are memory-mapped on load instead of read whole."""
from __future__ import annotations

import errno
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import traced_peak
from kd3.data import ingest as ingest_module
from kd3.data.ingest import IMAGE_EXTENSIONS, ingest
from kd3.data.pool import Pool
from kd3.data.synthetic import write_crawl
from kd3.engine.faults import WriteFailed


def _member_sources(pattern_root: Path) -> list[str]:
    """``shard.tar:member`` of every image member, shard by shard, in the order each tar holds them."""
    sources = []
    for shard in sorted(pattern_root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            sources += [f"{shard}:{name}" for name in tar.getnames() if Path(name).suffix in IMAGE_EXTENSIONS]
    return sources


@pytest.mark.parametrize("workers", [1, 2])
def test_shard_paths_are_every_member_in_pool_order_and_paths_npy_is_what_np_save_writes(tmp_path, workers):
    pattern, _ = write_crawl(tmp_path, count=23, per_shard=5, size=20, folder=False)
    expected = _member_sources(tmp_path / "shards")
    assert len(expected) == 23
    pool, _ = ingest(pattern, 8, 3, out=tmp_path / "pool", workers=workers)
    loaded = Pool.load(tmp_path / "pool")
    assert pool.paths.tolist() == loaded.paths.tolist() == expected
    assert [source.rsplit(":", 1)[1].split(".")[0] for source in expected] == [f"{i:09d}" for i in range(23)]
    # The same bytes the whole-array write gave, so pools written before and after read alike.
    reference = io.BytesIO()
    np.save(reference, np.array(expected), allow_pickle=False)
    assert (tmp_path / "pool" / "paths.npy").read_bytes() == reference.getvalue()
    assert isinstance(loaded.paths, np.memmap)  # on disk, not read into memory
    assert loaded.subset([22, 0]).paths.tolist() == [expected[22], expected[0]]

    in_memory, _ = ingest(pattern, 8, 3, out=tmp_path / "pool.npz", workers=workers)
    assert in_memory.paths.tolist() == Pool.load(tmp_path / "pool.npz").paths.tolist() == expected
    assert torch.equal(in_memory.images, loaded.images[:])


def test_paths_chunked_across_shards_keep_their_order_and_odd_names(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_module, "PATHS_CHUNK", 3)  # chunks that end mid-task
    monkeypatch.setattr(ingest_module, "PATHS_READ", 7)  # reads that end mid-path, mid-character
    root = tmp_path / "photos"
    root.mkdir()
    names = ["a.png", "é☃ snow.png", os.fsdecode(b"\xff-not-utf8.png"), "b.png", "c.png", "d.png", "e.png"]
    for value, name in enumerate(names):
        Image.new("L", (6, 6), 30 * value).save(os.path.join(os.fsencode(root), os.fsencode(name)), format="PNG")
    expected = sorted(str(root / name) for name in names)
    for out in (tmp_path / "pool", tmp_path / "pool.npz"):
        pool, _ = ingest(root, 4, 1, out=out, workers=2)
        assert Pool.load(out).paths.tolist() == expected
        values = [int(pool.images[i].float().mean()) for i in range(len(names))]
        assert values == [30 * names.index(Path(path).name) for path in expected]  # each path its own image


def test_an_old_pool_directory_loads_its_paths_and_a_pool_without_paths_loses_them(tmp_path):
    images = torch.arange(3, dtype=torch.uint8).reshape(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    old = ["/crawl/00000.tar:0.jpg", "/crawl/00000.tar:1.png", "/photos/a much longer file name.webp"]
    Pool.unlabelled(images, origin="ingested", paths=np.array(old)).save(tmp_path / "dir")  # np.save, as before
    assert Pool.load(tmp_path / "dir").paths.tolist() == old
    Pool.unlabelled(images, origin="built").save(tmp_path / "dir")
    assert Pool.load(tmp_path / "dir").paths is None


def test_ingest_never_holds_every_path_at_once(tmp_path, monkeypatch):
    # Long paths (a 200-character folder) make every path 1 KB as a <U array: 4 MB for 4,000 images,
    # which the old ingest built (and copied) at the end. Chunks of 100 (read 16 KB at a time) hold 100 KB of them.
    monkeypatch.setattr(ingest_module, "PATHS_CHUNK", 100)
    monkeypatch.setattr(ingest_module, "PATHS_READ", 1 << 14)
    root = tmp_path / ("d" * 200)
    root.mkdir()
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 9).save(buffer, format="PNG")
    count, per_shard = 4000, 200
    for number in range(count // per_shard):
        with tarfile.open(root / f"{number:05d}.tar", "w") as tar:
            for i in range(number * per_shard, (number + 1) * per_shard):
                info = tarfile.TarInfo(f"{i:09d}.png")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))
    pattern = str(root / f"{{00000..{count // per_shard - 1:05d}}}.tar")
    whole = np.array([f"{root / '00000.tar'}:{0:09d}.png"] * count).nbytes
    assert whole > 4e6, whole

    (pool, _), peak = traced_peak(lambda: ingest(pattern, 4, 1, out=tmp_path / "pool", workers=1))
    assert pool.paths[count - 1] == f"{root / f'{count // per_shard - 1:05d}.tar'}:{count - 1:09d}.png"
    assert peak < whole / 2, (peak, whole)


def test_a_full_disk_while_streaming_paths_is_one_write_failure_and_leaves_the_old_pool(tmp_path, monkeypatch):
    pattern, _ = write_crawl(tmp_path, count=6, per_shard=3, size=12, folder=False)
    out = tmp_path / "pool"
    ingest(pattern, 8, 3, out=out, workers=1)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def full(self, paths):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ingest_module._PathStream, "write", full)
    with pytest.raises(WriteFailed, match="paths.npy"):
        ingest(pattern, 8, 3, out=out, workers=1)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # nothing new, no temp file
