"""Ingested pools keep where each image came from (``Pool.paths``), through .npz, pool directories,
``Pool.load`` and subsets; ``kd3 data show`` samples an ingested pool at random, seeded."""
from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kd3.cli import main
from kd3.data.grid import LABEL_WIDTH, PAD, grid_geometry
from kd3.data.ingest import ingest
from kd3.data.pool import Pool
from kd3.data.synthetic import write_crawl


def test_folder_paths_survive_ingest_npz_directory_load_and_subset(tmp_path):
    root = tmp_path / "photos"
    (root / "b").mkdir(parents=True)
    for name, value in [("z.png", 10), ("a.png", 20), ("b/m.png", 30)]:
        Image.new("L", (12, 9), value).save(root / name)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    expected = [str(root / "a.png"), str(root / "b" / "m.png"), str(root / "z.png")]  # sorted, broken one skipped
    for out in (tmp_path / "pool.npz", tmp_path / "pooldir"):
        pool, _ = ingest(root, 8, 1, out=out, workers=1)
        assert pool.paths.tolist() == expected
        loaded = Pool.load(out)
        assert loaded.paths.tolist() == expected
        assert [int(loaded.images[i].float().mean()) for i in range(3)] == [20, 30, 10]  # each path its image
        assert loaded.subset([2, 0]).paths.tolist() == [expected[2], expected[0]]
    assert (tmp_path / "pooldir" / "paths.npy").is_file()


def test_relative_folders_are_kept_as_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "one.png")
    monkeypatch.chdir(tmp_path)
    pool, _ = ingest("imgs", 8, 3, workers=1)
    assert pool.paths.tolist() == [os.path.join(tmp_path, "imgs", "one.png")]


def test_shard_paths_name_the_tar_and_its_member(tmp_path):
    pattern, _ = write_crawl(tmp_path, count=12, per_shard=5, size=20, folder=False)
    pool, _ = ingest(pattern, 8, 3, out=tmp_path / "pool", workers=1)
    paths = Pool.load(tmp_path / "pool").paths.tolist()
    assert len(paths) == 12
    shard, member = paths[7].rsplit(":", 1)
    assert shard == str(tmp_path / "shards" / "00001.tar") and member.startswith("000000007.")
    with tarfile.open(shard) as tar:
        assert member in tar.getnames()


def test_built_pools_have_no_paths_and_do_not_inherit_stale_ones(tmp_path):
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    with_paths = Pool.unlabelled(images, origin="web", paths=np.array(["x", "y", "z"]))
    with_paths.save(tmp_path / "dir")
    built = Pool.unlabelled(images, origin="built")
    assert Pool.load(built.save(tmp_path / "p.npz")).paths is None
    built.save(tmp_path / "dir")  # over the pool that had paths
    assert Pool.load(tmp_path / "dir").paths is None
    assert Pool.unlabelled(images, origin="web").digest() == with_paths.digest()  # paths are not hashed
    with pytest.raises(ValueError, match="paths has 2 entries for 3 images"):
        Pool.unlabelled(images, origin="web", paths=np.array(["x", "y"]))


def _tiles(png, count: int, size: int) -> list[int]:
    """The grey level of the first ``count`` tiles of a one-group grid (each pool image is one flat grey)."""
    cell = grid_geometry(size, 1, count)[0]
    with Image.open(png) as sheet:
        return [sheet.getpixel((LABEL_WIDTH + PAD + j * (cell + PAD) + cell // 2, PAD + cell // 2))[0]
                for j in range(count)]


def test_show_samples_an_ingested_pool_at_random_with_a_seed(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(30):  # image i is flat grey 8·i, so a tile says which image it is
        Image.new("L", (16, 16), 8 * i).save(root / f"{i:02d}.png")
    assert main(["data", "ingest", str(root), "--size", "16", "--channels", "1", "--out", str(tmp_path / "pool"),
                 "--workers", "1"]) == 0
    shown = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        out = tmp_path / f"{name}.png"
        assert main(["data", "show", str(tmp_path / "pool"), "--per-group", "5", "--seed", str(seed),
                     "--out", str(out)]) == 0
        shown[name] = [value // 8 for value in _tiles(out, 5, 16)]
    assert shown["a"] == shown["b"] == np.random.default_rng(0).permutation(30)[:5].tolist()
    assert shown["a"] != [0, 1, 2, 3, 4] and shown["c"] != shown["a"]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
