"""WebDataset tar shards as img2dataset writes them: ``{00000..00099}.tar``, one sample per key.

A sample is the tar members that share a key (``000000042.jpg``, ``000000042.json``,
``000000042.txt``); the image is its first member with an image extension, the json/txt members
are kept as metadata. Members are read one by one with ``tarfile``, in shard order then member
order, so a pool ingested from shards has a deterministic order, and a member that is no file
(a link, a FIFO, a duplicate name) or a damaged stretch costs only itself, counted by reason. Like
``decode``, this module is imported by ingest's worker processes and does not import torch.
"""
from __future__ import annotations

import glob
import io
import json
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from kd3.data.decode import DEFAULT_ALPHA, try_decode

SCAN_CHUNK = 1 << 20  # bytes read at a time when checking what the tar reader stepped over
# Every reason a shard's member or stretch is skipped under (an image that does not decode is
# counted under kd3.data.decode's reasons).
SHARD_REASONS = ("no image member", "duplicate member", "link member", "special member", "damaged tar region",
                 "truncated tar", "unreadable shard")
# img2dataset writes jpg by default, png or webp on request; the rest is what Pillow reads.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")


def is_shard_spec(spec: str) -> bool:
    """Whether ``spec`` names tar shards (a .tar file, a brace pattern or a glob of them)."""
    return ".tar" in spec and not Path(spec).is_dir()


def find_shards(spec: str, allow_missing: bool = False) -> tuple[list[Path], list[Path]]:
    """The shard files of ``spec`` (brace patterns ``data/{00000..00099}.tar`` and globs) in the pattern's
    order: those that exist, and those it names that do not (img2dataset's output often has gaps).

    Raises ``FileNotFoundError`` when none exists, or when some are missing and not ``allow_missing``:
    how many, the first few, and the flag that skips them."""
    paths: list[Path] = []
    for pattern in braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        paths += [Path(p) for p in matches]
    present = [p for p in paths if p.is_file()]
    missing = [p for p in paths if not p.is_file()]
    shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    if not present:
        raise FileNotFoundError(f"shards {spec!r}: {shown or 'the pattern matches no file'} not found")
    if missing and not allow_missing:
        raise FileNotFoundError(f"shards {spec!r}: {len(missing)} of the {len(paths)} shards are missing ({shown}); "
                                "skip them with --allow-missing (allow_missing=True)")
    return present, missing


def expand_shards(spec: str, allow_missing: bool = False) -> list[Path]:
    """The existing shard files of ``spec`` (``find_shards``)."""
    return find_shards(spec, allow_missing)[0]


def shard_pattern(directory: Path) -> str | None:
    """The pattern naming the .tar shards in ``directory`` (None: there are none): a brace range when they
    are numbered as img2dataset numbers them (``DIR/{00000..00029}.tar``), else a glob."""
    stems = sorted(p.name[:-len(".tar")] for p in directory.glob("*.tar") if p.is_file())
    if not stems:
        return None
    if all(s.isdigit() for s in stems) and len({len(s) for s in stems}) == 1:
        return str(directory / f"{{{stems[0]}..{stems[-1]}}}.tar")
    return str(directory / "*.tar")


def _image_member(sample: dict[str, Any]) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def _side_data(sample: dict[str, Any]) -> dict[str, Any]:
    side: dict[str, Any] = {}
    if "json" in sample:
        try:
            side["json"] = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            side["json_unreadable"] = True
    if "txt" in sample:
        side["txt"] = sample["txt"].decode("utf-8", errors="replace")
    return side


def _tar_members(path: str) -> Iterator[tuple[str, bytes | None, str]]:
    """Every member of the tar ``path`` in archive order: (member name, data, "") for a regular
    file; (where, None, reason) for a member that holds no file data, and for each damaged stretch
    (the members after it are still read).

    Read member by member with ``tarfile``: ``ignore_zeros`` steps over the end-of-archive blocks of
    concatenated tars and block by block over damage to the next valid header. In an uncompressed
    tar every byte the reader stepped over is checked (zeros are padding; anything else is counted
    as damage); a compressed one is not looked back into (that would decompress it again from its
    start), so damage there costs the members it hit, uncounted.
    """
    with tarfile.open(path, "r:*", ignore_zeros=True) as tar:
        raw = tar.fileobj if isinstance(tar.fileobj, io.BufferedReader) else None
        end, found = 0, False
        while True:
            try:
                member = tar.next()
            except tarfile.ReadError as error:
                if "unexpected end of data" in str(error):
                    yield path, None, "truncated tar"
                    return
                # A header tarfile cannot parse (a broken pax or GNU long-name record): skip its block.
                yield f"{path} at byte {tar.offset}", None, "damaged tar region"
                end = tar.offset = tar.offset + tarfile.BLOCKSIZE
                continue
            if member is None:
                break
            tar.members.clear()  # nothing is extracted by link: the index would only grow with the shard
            if _has_data(raw, end, member.offset):
                yield f"{path} at byte {end}", None, "damaged tar region"
            end, found = tar.offset, True
            if member.isdir():
                continue  # a folder entry is structure, not content
            if member.issym() or member.islnk():
                yield f"{path}:{member.name}", None, "link member"
            elif not member.isreg():
                yield f"{path}:{member.name}", None, "special member"  # FIFO, character or block device, ...
            else:
                extracted = tar.extractfile(member)
                try:
                    data = extracted.read() if extracted is not None else b""
                except tarfile.ReadError:
                    yield path, None, "truncated tar"
                    return
                yield member.name, data, ""
        if _has_data(raw, end, None):
            # Bytes after the last member that form no header: a member cut inside its header, or garbage.
            yield path, None, "truncated tar" if found else "unreadable shard"


def _has_data(raw: BinaryIO | None, start: int, stop: int | None) -> bool:
    """Whether bytes ``start``..``stop`` (None: the end) of the uncompressed archive ``raw`` hold anything
    but zeros; False for a compressed one (None)."""
    if raw is None or (stop is not None and stop <= start):
        return False
    raw.seek(start)
    left = None if stop is None else stop - start
    while left is None or left > 0:
        block = raw.read(SCAN_CHUNK if left is None else min(SCAN_CHUNK, left))
        if not block:
            return False
        if block.strip(b"\0"):
            return True
        if left is not None:
            left -= len(block)
    return False


def _samples(path: str, bad: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """The samples of the tar ``path`` ({"__key__": key, ext: bytes, ...}), appending (where, reason)
    to ``bad`` for each member that joins none."""
    sample: dict[str, Any] | None = None
    seen: set[str] = set()
    try:
        for name, data, reason in _tar_members(path):
            if data is None:
                bad.append((name, reason))
                continue
            key, ext = base_plus_ext(name)
            if key is None:  # no extension: a member that belongs to no sample
                bad.append((f"{path}:{name}", "no image member"))
                continue
            ext = ext.lower()
            if f"{key}.{ext}" in seen:
                bad.append((f"{path}:{name}", "duplicate member"))
                continue
            seen.add(f"{key}.{ext}")
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            sample[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        # A compressed shard cut short, or a file that is no archive at all: what was read is kept.
        bad.append((path, "truncated tar" if seen or bad else "unreadable shard"))
    if sample is not None:
        yield sample


def decode_shard(path: str, size: int, channels: int, alpha: str = DEFAULT_ALPHA
                 ) -> tuple[np.ndarray, list[dict], list[tuple[str, str]], Counter[str]]:
    """Every image sample of one shard: (uint8 images, per-image metadata, [(where, reason)] skipped,
    conversions counted by ``kd3.data.decode.decode_bytes``); ``alpha``: the background transparent
    pixels are composited onto.

    Members sharing a key (webdataset's ``base_plus_ext``: the name up to its first dot) and
    following each other form a sample. One odd member costs only itself, under a named reason:
    a second member of a name already read ("duplicate member": what ``tar -r`` appends; the first
    copy is kept), a symlink or hard link ("link member"), a FIFO or device ("special member"), a
    stretch of bytes that is no member ("damaged tar region"; the members after it are read). A
    shard cut short keeps every sample read before the cut and counts one "truncated tar".
    """
    images, metadata, bad = [], [], []
    conversions: Counter[str] = Counter()
    for sample in _samples(path, bad):
        name = f"{path}:{sample['__key__']}"
        ext = _image_member(sample)
        if ext is None:
            bad.append((name, "no image member"))
            continue
        image, reason = try_decode(sample[ext], size, channels, alpha, conversions)
        if image is None:
            bad.append((f"{name}.{ext}", reason or "corrupt image"))
            continue
        images.append(image)
        metadata.append({"key": sample["__key__"], "shard": path, "member": f"{sample['__key__']}.{ext}",
                         **_side_data(sample)})
    stacked = np.stack(images) if images else np.empty((0, channels, size, size), dtype=np.uint8)
    return stacked, metadata, bad, conversions
