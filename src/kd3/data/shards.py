"""WebDataset tar shards as img2dataset writes them: ``{00000..00099}.tar``, one sample per key.

A sample is the tar members that share a key (``000000042.jpg``, ``000000042.json``,
``000000042.txt``); the image is its first member with an image extension, the json/txt members
are kept as metadata. Members are read with the ``webdataset`` package's tar iterator, in shard
order then member order, so a pool ingested from shards has a deterministic order. Like
``decode``, this module is imported by ingest's worker processes and does not import torch.
"""
from __future__ import annotations

import glob
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator

from kd3.data.decode import try_decode

# img2dataset writes jpg by default, png or webp on request; the rest is what Pillow reads.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")


def is_shard_spec(spec: str) -> bool:
    """Whether ``spec`` names tar shards (a .tar file, a brace pattern or a glob of them)."""
    return ".tar" in spec and not Path(spec).is_dir()


def expand_shards(spec: str) -> list[Path]:
    """The shard files of ``spec``: brace patterns (``data/{00000..00099}.tar``) and globs, in the
    pattern's order. Raises ``FileNotFoundError`` naming the shards that do not exist."""
    paths: list[Path] = []
    for pattern in braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        paths += [Path(p) for p in matches]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"shards {spec!r}: {shown or 'the pattern matches no file'} not found")
    return paths


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


def _raise(error: Exception) -> bool:
    raise error


def decode_shard(path: str, size: int, channels: int) -> tuple[np.ndarray, list[dict], list[tuple[str, str]]]:
    """Every image sample of one shard: (uint8 images, per-image metadata, [(member, reason)] skipped).

    A truncated or corrupt tar keeps the samples read before the damage and reports the rest
    as one "truncated tar" entry.
    """
    images, metadata, bad = [], [], []
    try:
        with open(path, "rb") as stream:
            members = ({**m, "__url__": path} for m in tar_file_iterator(stream, handler=_raise))
            for sample in group_by_keys(members, handler=_raise):
                name = f"{path}:{sample['__key__']}"
                ext = _image_member(sample)
                if ext is None:
                    bad.append((name, "no image member"))
                    continue
                image, reason = try_decode(sample[ext], size, channels)
                if image is None:
                    bad.append((f"{name}.{ext}", reason or "corrupt image"))
                    continue
                images.append(image)
                metadata.append({"key": sample["__key__"], "shard": path, **_side_data(sample)})
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        # ValueError: webdataset's duplicate-member check; the rest: a cut or damaged archive.
        reason = "unreadable shard" if isinstance(error, OSError) and not images and not bad else "truncated tar"
        bad.append((path, reason))
    stacked = np.stack(images) if images else np.empty((0, channels, size, size), dtype=np.uint8)
    return stacked, metadata, bad
