"""Synthetic web images for ingest tests and the scale benchmark: an img2dataset-style crawl.

``write_crawl`` writes the same encoded images twice if asked, as WebDataset tar shards
(``00000.tar`` … with ``key.jpg`` / ``key.json`` / ``key.txt`` members, as img2dataset writes
them) and as a folder (``key.jpg`` + ``key.json``, img2dataset's "files" format), so the two
ingest paths can be compared byte for byte.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image


def encoded_images(count: int, size: int, seed: int = 0, formats: tuple[str, ...] = ("jpeg", "png", "webp")
                   ) -> Iterator[tuple[str, bytes]]:
    """(extension, bytes) of ``count`` smooth random RGB images, cycling through ``formats``."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        fmt = formats[i % len(formats)]
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **({"quality": 90} if fmt in ("jpeg", "webp") else {}))
        yield {"jpeg": "jpg"}.get(fmt, fmt), buffer.getvalue()


def write_crawl(root: Path, count: int, per_shard: int, size: int = 48, seed: int = 0, shards: bool = True,
                folder: bool = True) -> tuple[str, Path]:
    """Write ``count`` images as shards under ``root/shards`` and/or files under ``root/files``;
    returns (the shard brace pattern, the folder)."""
    from webdataset import TarWriter

    shard_dir, file_dir = root / "shards", root / "files"
    shard_dir.mkdir(parents=True, exist_ok=True)
    file_dir.mkdir(parents=True, exist_ok=True)
    writer = None
    for i, (ext, data) in enumerate(encoded_images(count, size, seed)):
        key = f"{i:09d}"
        side = {"url": f"https://example.com/{key}.{ext}", "caption": f"image {i}"}
        if shards:
            if i % per_shard == 0:
                if writer is not None:
                    writer.close()
                writer = TarWriter(str(shard_dir / f"{i // per_shard:05d}.tar"))
            writer.write({"__key__": key, ext: data, "json": json.dumps(side).encode(), "txt": side["caption"].encode()})
        if folder:
            (file_dir / f"{key}.{ext}").write_bytes(data)
            (file_dir / f"{key}.json").write_text(json.dumps(side))
    if writer is not None:
        writer.close()
    last = (count - 1) // per_shard
    return str(shard_dir / f"{{00000..{last:05d}}}.tar"), file_dir
