"""Fuzzing ingest (hypothesis): mangled image files and mangled WebDataset shards never crash or
hang it; every file is either loaded or skipped under a named reason.

Mangles start from valid PNG, JPEG, GIF, BMP and WebP bytes: truncation, byte overwrites (in the
header or the payload), inserted bytes, a header claiming huge dimensions, or bytes that were never
an image. Examples are derandomized so CI is repeatable (run with ``--hypothesis-seed`` to explore)."""
from __future__ import annotations

import io
import signal
import struct
import tarfile
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kd3.data.decode import try_decode
from kd3.data.ingest import ingest
from kd3.data.shards import SHARD_REASONS

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP"]
REASONS = {"not an image", "too many pixels", "truncated image", "unreadable file", "corrupt image"}
SIZE = 12
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                       HealthCheck.function_scoped_fixture])
SECONDS = 30  # per example: far above a healthy ingest of a few small files, so only a hang trips it


def encoded(fmt: str, seed: int = 0, side: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def mangled(draw) -> bytes:
    """The bytes of a small image in some format after one or more mangles."""
    data = bytearray(encoded(draw(st.sampled_from(FORMATS)), draw(st.integers(0, 3))))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "huge", "garbage"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "huge" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
            data[16:24] = struct.pack(">II", *draw(st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))))
        elif kind == "garbage":
            data = bytearray(draw(st.binary(max_size=256)))
    return bytes(data)


@contextmanager
def no_hang(seconds: int = SECONDS):
    def expired(signum, frame):
        raise TimeoutError(f"ingest did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@FUZZ
@given(data=mangled(), channels=st.sampled_from([1, 3]))
def test_decoding_mangled_bytes_gives_an_image_or_a_reason(data, channels):
    with no_hang():
        image, reason = try_decode(data, SIZE, channels)
    if image is None:
        assert reason in REASONS
    else:
        assert reason is None and image.dtype == np.uint8 and image.shape == (channels, SIZE, SIZE)


@settings(FUZZ, max_examples=15)
@given(files=st.lists(mangled(), min_size=1, max_size=6))
def test_a_folder_of_mangled_files_ingests_with_every_file_accounted_for(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mangled")
    (folder / "good.png").write_bytes(encoded("PNG", 9))  # one sound image, so ingest has a pool to return
    for i, data in enumerate(files):
        (folder / f"m{i}.{['png', 'jpg', 'gif', 'bmp', 'webp'][i % 5]}").write_bytes(data)
    with no_hang():
        pool, report = ingest(folder, SIZE, 3, workers=1)
    assert report.found == len(files) + 1 and report.loaded + report.skipped == report.found
    assert len(pool) == report.loaded >= 1 and set(report.reasons) <= REASONS
    assert tuple(pool.images.shape[1:]) == (3, SIZE, SIZE)


def _shard(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@st.composite
def mangled_shard(draw) -> bytes:
    """A tar of image (some mangled) and caption members, then maybe cut or overwritten anywhere."""
    members = []
    for i in range(draw(st.integers(1, 4))):
        image = draw(mangled()) if draw(st.booleans()) else encoded(draw(st.sampled_from(FORMATS)), i)
        members += [(f"{i:09d}.{draw(st.sampled_from(['jpg', 'png', 'webp']))}", image),
                    (f"{i:09d}.txt", f"caption {i}".encode())]
    data = bytearray(_shard(members))
    kind = draw(st.sampled_from(["none", "truncate", "overwrite", "garbage"]))
    at = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        del data[at:]
    elif kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=64))
        data[at:at + len(chunk)] = chunk
    elif kind == "garbage":
        data = bytearray(draw(st.binary(max_size=2048)))
    return bytes(data)


@settings(FUZZ, max_examples=15)
@given(shard=mangled_shard(), workers=st.sampled_from([1, 2]))
def test_mangled_shards_ingest_without_crashing(shard, workers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    sound = [(f"{i:09d}.png", encoded("PNG", i)) for i in range(3)]
    (folder / "00000.tar").write_bytes(_shard(sound))
    (folder / "00001.tar").write_bytes(shard)
    with no_hang():
        pool, report = ingest(str(folder / "{00000..00001}.tar"), SIZE, 1, workers=workers)
    assert len(pool) == report.loaded >= len(sound)
    assert set(report.reasons) <= REASONS | set(SHARD_REASONS)
    assert tuple(pool.images.shape[1:]) == (1, SIZE, SIZE)


def test_fuzzing_is_not_vacuous(tmp_path):
    """The mangles do break files: a truncated PNG is refused with a reason, a sound one decodes,
    and a folder with nothing readable is the one error ingest raises."""
    sound = encoded("PNG")
    assert try_decode(sound, SIZE, 1)[0] is not None
    image, reason = try_decode(sound[:len(sound) // 2], SIZE, 1)
    assert image is None and reason in REASONS
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable image"):
        ingest(tmp_path, SIZE, 1, workers=1)
