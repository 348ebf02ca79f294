"""Turn a folder of user images (a scraped web pool) into a ``Pool``, skipping what won't decode."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from kd3.data.pool import Pool

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm"})
MAX_BAD_PATHS = 10  # how many unreadable files the report names; the count covers them all

# What Pillow raises on truncated, corrupt or hostile files (it has no single error type).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError)


@dataclass
class IngestReport:
    directory: str
    found: int  # files with an image extension
    loaded: int
    skipped: int
    bad_paths: list[str] = field(default_factory=list)  # the first MAX_BAD_PATHS unreadable files

    def __str__(self) -> str:
        text = f"{self.directory}: {self.loaded} of {self.found} image files loaded"
        if self.skipped:
            text += f", {self.skipped} unreadable (first: {', '.join(self.bad_paths)})"
        return text


def _image_files(directory: Path) -> list[Path]:
    # Sorted so the pool's order, and so any seeded run over it, is the same on every machine.
    return sorted(p for p in directory.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _decode(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode, orient, flatten alpha onto white, convert, cover-resize to size×size."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
        if img.mode in ("RGBA", "LA", "P", "PA"):
            # Web images with transparency are drawn on white pages; keep that look.
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        img = img.convert("L" if channels == 1 else "RGB")
        # Shorter side to `size`, then a centre crop: what ImageOps.fit does in one step.
        img = ImageOps.fit(img, (size, size), method=Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def ingest_folder(directory: str | os.PathLike, size: int,
                  channels: int) -> tuple[Pool, IngestReport]:
    """Every readable image under ``directory`` (recursively) as uint8 N×channels×size×size.

    Provenance is unknown: ``meta['provenance']`` is False, ``relevant`` all False and
    ``true_label`` all -1. Raises ``FileNotFoundError`` if the folder does not exist and
    ``ValueError`` if it holds no readable image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    files = _image_files(root)
    images, bad = [], []
    for path in files:
        try:
            images.append(_decode(path, size, channels))
        except _DECODE_ERRORS:
            bad.append(path)
    report = IngestReport(directory=str(root), found=len(files), loaded=len(images),
                          skipped=len(bad), bad_paths=[str(p) for p in bad[:MAX_BAD_PATHS]])
    if not images:
        raise ValueError(f"no readable image in {root}: {len(files)} files with an image "
                         f"extension ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                         f"{len(bad)} failed to decode")
    pool = Pool.unlabelled(torch.from_numpy(np.stack(images)), origin="folder", meta={
        "directory": str(root), "size": size, "channels": channels, "image_shape": [channels, size, size],
        "counts": {"found": report.found, "loaded": len(images), "skipped": report.skipped}})
    return pool, report
