"""Ingest of img2dataset-style WebDataset shards: the same pool as the same images in a folder, the
same pool with any number of workers, damaged shards and members skipped and counted by reason."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kd3.cli import main
from kd3.data.ingest import SIDECAR_FILE, ingest
from kd3.data.pool import Pool
from kd3.data.shards import expand_shards
from kd3.data.synthetic import write_crawl


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("crawl")
    pattern, folder = write_crawl(root, count=45, per_shard=10, size=40)
    return root, pattern, folder


def test_shards_folder_and_worker_counts_give_one_pool(crawl, tmp_path):
    root, pattern, folder = crawl
    assert pattern.endswith("{00000..00004}.tar")
    one, report = ingest(pattern, 16, 3, workers=1)
    two, _ = ingest(pattern, 16, 3, out=tmp_path / "two", workers=2)
    files, _ = ingest(folder, 16, 3, workers=2)
    assert (report.found, report.loaded, report.skipped) == (45, 45, 0) and one.images.shape == (45, 3, 16, 16)
    assert two.on_disk and one.digest() == two.digest() == files.digest()
    assert (tmp_path / "two" / "images.npy").read_bytes()[-16 * 16 * 3:] == one.images[-1].numpy().tobytes()


def test_shard_side_members_are_kept_as_metadata(crawl, tmp_path):
    _, pattern, _ = crawl
    ingest(pattern, 16, 3, out=tmp_path / "pool", workers=1)
    records = [json.loads(line) for line in (tmp_path / "pool" / SIDECAR_FILE).read_text().splitlines()]
    assert len(records) == 45 and records[12]["key"] == "000000012"
    assert records[12]["json"]["caption"] == records[12]["txt"] == "image 12"
    assert records[12]["shard"].endswith("00001.tar")


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_members_and_truncated_shards_are_counted_by_reason(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _member(tar, "a.png", _png(10))
        _member(tar, "b.jpg", b"\xff\xd8 not a jpeg")  # does not decode
        _member(tar, "c.json", b'{"only": "metadata"}')  # no image member
        _member(tar, "d.png", _png(200))
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:
        for i in range(6):
            _member(tar, f"e{i}.png", _png(50 + i))
    cut = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(cut[:len(cut) // 2 - 300])  # a download cut inside a member
    pool, report = ingest(str(tmp_path / "{00000..00001}.tar"), 8, 1, workers=2)
    assert report.reasons["not an image"] == 1 and report.reasons["no image member"] == 1
    assert report.reasons["truncated tar"] == 1
    assert any("00000.tar:b.jpg (not an image)" in p for p in report.bad_paths)
    kept = [int(img.max()) for img in pool.images]
    assert kept[:2] == [10, 200] and 2 < len(kept) < 8  # the members before the cut are kept, in order
    assert kept[2:] == [50 + i for i in range(len(kept) - 2)]
    assert "truncated tar" in str(report)


def test_missing_shards_and_empty_results_are_clear(tmp_path, crawl):
    _, pattern, _ = crawl
    with pytest.raises(FileNotFoundError, match="00009.tar"):
        expand_shards(pattern.replace("00004", "00009"))
    (tmp_path / "junk.tar").write_bytes(b"this is no tar file at all" * 40)
    with pytest.raises(ValueError, match="no readable image"):
        ingest(str(tmp_path / "junk.tar"), 8, 1, workers=1)


def test_cli_ingests_shards_into_a_pool_directory(crawl, tmp_path, capsys):
    _, pattern, _ = crawl
    out = tmp_path / "pool"
    assert main(["data", "ingest", pattern, "--size", "16", "--channels", "1", "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "45 of 45 images loaded" in printed and "images/s" in printed and "2 workers" in printed
    pool = Pool.load(out)
    assert pool.images.shape == (45, 1, 16, 16) and not pool.has_provenance
    assert np.array_equal(pool.images[3:5].numpy(), ingest(pattern, 16, 1, workers=1)[0].images[3:5].numpy())
    assert torch.equal(pool.subset([0]).images[:], pool.images[:1])
