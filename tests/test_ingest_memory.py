"""Ingest's side records (img2dataset's json/txt members, a folder's sidecar files) go to
``sidecar.jsonl`` as they are decoded (issue 24, part 2): the file is byte for byte what ingest
always wrote, it appears only whole (a temp file renamed at the end), and memory does not grow
with a list of every record."""
from __future__ import annotations

import errno
import io
import json
import os
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import traced_peak
from kd3.data import ingest as ingest_module
from kd3.data.ingest import SIDECAR_FILE, ingest
from kd3.data.storage import ImageWriter
from kd3.engine.faults import WriteFailed


def _png(value: int, size: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _lines(records: list[dict]) -> bytes:
    """What ingest has always written: one ``json.dumps(record, sort_keys=True)`` line per image."""
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in records).encode()


def test_the_streamed_sidecar_is_byte_identical_to_the_records_written_whole(tmp_path):
    shard = tmp_path / "00000.tar"
    caption = {"caption": "ünïcode ☃ caption", "url": "http://x/0", "nested": {"b": 1, "a": [1, 2.5, None]}}
    _write_tar(shard, [("000.png", _png(10)), ("000.json", json.dumps(caption).encode()), ("000.txt", b"text \xc3\xa9 \xff"),
                       ("001.png", _png(11)),
                       ("002.png", b"not an image"), ("002.json", b"{}"),
                       ("003.png", _png(13)), ("003.json", b"{not json")])
    _, report = ingest(str(shard), 4, 1, out=tmp_path / "pool", workers=1)
    assert report.loaded == 3
    where = {"shard": str(shard)}
    expected = [{"key": "000", "member": "000.png", **where, "json": caption, "txt": "text é \ufffd"},
                {"key": "001", "member": "001.png", **where},
                {"key": "003", "member": "003.png", **where, "json_unreadable": True}]
    assert (tmp_path / "pool" / SIDECAR_FILE).read_bytes() == _lines(expected)

    folder = tmp_path / "files"  # img2dataset's "files" format: side files beside each image
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes(_png(index))
    (folder / "0.json").write_text(json.dumps({"k": "é"}))
    (folder / "1.txt").write_text("a caption")
    (folder / "2.json").write_text("{bad")
    ingest(folder, 4, 1, out=tmp_path / "folder-pool", workers=1)
    expected = [{"key": "0", "file": str(folder / "0.png"), "json": {"k": "é"}},
                {"key": "1", "file": str(folder / "1.png"), "txt": "a caption"},
                {"key": "2", "file": str(folder / "2.png"), "json_unreadable": True}]
    assert (tmp_path / "folder-pool" / SIDECAR_FILE).read_bytes() == _lines(expected)
    assert sorted(os.listdir(tmp_path / "folder-pool")) == sorted(os.listdir(tmp_path / "pool"))  # no temp file left


def test_records_reach_the_temp_file_as_they_are_decoded_and_the_sidecar_appears_only_whole(tmp_path, monkeypatch):
    shards = []
    for number in range(3):
        shards.append(tmp_path / f"{number:05d}.tar")
        _write_tar(shards[-1], [member for i in range(2) for member in
                                ((f"{number}{i}.png", _png(i)), (f"{number}{i}.json", json.dumps({"n": number}).encode()))])
    out = tmp_path / "pool"
    seen: list[tuple[bool, int]] = []
    real_write = ingest_module._SidecarWriter.write

    def write(self, records):
        real_write(self, records)
        self.file.flush()
        seen.append(((out / SIDECAR_FILE).exists(), self.tmp.read_bytes().count(b"\n")))

    monkeypatch.setattr(ingest_module._SidecarWriter, "write", write)
    ingest(str(tmp_path / "{00000..00002}.tar"), 4, 1, out=out, workers=1)
    assert seen == [(False, 2), (False, 4), (False, 6)]  # on disk shard by shard, under the temp name only
    assert (out / SIDECAR_FILE).read_bytes().count(b"\n") == 6 and not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_a_failed_reingest_leaves_the_old_sidecar_and_no_temp_file(tmp_path, monkeypatch):
    shard = tmp_path / "00000.tar"
    _write_tar(shard, [("0.png", _png(1)), ("0.json", b'{"old": true}')])
    out = tmp_path / "pool"
    ingest(str(shard), 4, 1, out=out, workers=1)
    before = (out / SIDECAR_FILE).read_bytes()
    _write_tar(shard, [("0.png", _png(1)), ("0.json", b'{"new": true}')])

    def full(self, images):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ImageWriter, "write", full)
    with pytest.raises(WriteFailed):
        ingest(str(shard), 4, 1, out=out, workers=1)
    assert (out / SIDECAR_FILE).read_bytes() == before and not [p for p in os.listdir(out) if p.endswith(".tmp")]


# A record as img2dataset writes it (its json member): about 2 KB as a Python dict.
RECORD = {"url": "https://example.com/images/{i}.jpg", "caption": "a photograph of something ordinary, number {i}, "
          "taken on a sunny afternoon in a small town", "key": "{i:09d}", "status": "success", "error_message": None,
          "width": 64, "height": 64, "original_width": 800, "original_height": 600, "sha256": "{i:064x}",
          "exif": {f"Image Tag {t}": f"value {t} of image {{i}}" for t in range(12)}}
SAMPLES, PER_SHARD = 10_000, 250


def _record(i: int) -> bytes:
    def fill(value):
        if isinstance(value, dict):
            return {key: fill(item) for key, item in value.items()}
        return value.format(i=i) if isinstance(value, str) else value
    return json.dumps(fill(RECORD)).encode()


def test_ingest_memory_stays_flat_while_the_old_list_of_records_would_not(tmp_path):
    png = _png(7)
    for number in range(SAMPLES // PER_SHARD):
        first = number * PER_SHARD
        _write_tar(tmp_path / f"{number:05d}.tar",
                   [member for i in range(first, first + PER_SHARD)
                    for member in ((f"{i:09d}.png", png), (f"{i:09d}.json", _record(i)), (f"{i:09d}.txt", b"caption"))])
    pattern = str(tmp_path / f"{{00000..{SAMPLES // PER_SHARD - 1:05d}}}.tar")

    # What the old ingest held until the end: every record as a dict (what decode_shard returns).
    tracemalloc.start()
    held = [{"key": f"{i:09d}", "shard": str(tmp_path / f"{i // PER_SHARD:05d}.tar"), "member": f"{i:09d}.png",
             "json": json.loads(_record(i)), "txt": "caption"} for i in range(SAMPLES)]
    old_cost = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del held

    (pool, report), peak = traced_peak(lambda: ingest(pattern, 4, 1, out=tmp_path / "pool", workers=1))
    assert report.loaded == len(pool) == SAMPLES
    lines = (tmp_path / "pool" / SIDECAR_FILE).read_bytes().splitlines()
    assert len(lines) == SAMPLES and json.loads(lines[-1])["json"]["key"] == f"{SAMPLES - 1:09d}"
    # The old list alone is about 40 MB (4 KB a record); the whole streamed ingest (the source paths,
    # one shard's records, the pool arrays: about 7-11 MB) stays under half of it.
    assert old_cost > 20e6, old_cost
    assert peak < old_cost / 2, (peak, old_cost)
    assert np.array_equal(pool.images[SAMPLES - 1][0].numpy(), np.full((4, 4), 7, dtype=np.uint8))
