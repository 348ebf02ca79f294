"""Decode one web image (a file or the bytes of a tar member) into a uint8 C×size×size array.

This module is what ingest's worker processes import, so it imports only numpy and Pillow:
a worker starts in a fraction of a second and never initialises torch.
"""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A web thumbnail has well under this many pixels; a file that claims more is a decompression
# bomb or a mistake, and decoding it would stall a worker for seconds.
MAX_PIXELS = 40_000_000


def decode_bytes(data: bytes, size: int, channels: int) -> np.ndarray:
    """Decode, orient, flatten alpha onto white, convert, cover-resize to size×size."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}×{img.height} pixels")
            # JPEG can decode straight to a smaller scale (DCT scaling): big photos cost little.
            img.draft(img.mode, (size, size))
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


def failure_reason(error: BaseException) -> str:
    """The per-reason bucket an ingest report counts a file under."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "too many pixels"
    if isinstance(error, (OSError, EOFError)) and "truncated" in str(error).lower():
        return "truncated image"
    if isinstance(error, OSError) and not isinstance(error, UnidentifiedImageError) and error.errno is not None:
        return "unreadable file"
    return "corrupt image"


# What Pillow raises on truncated, corrupt or hostile files (it has no single error type).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, TypeError, IndexError,
                 ZeroDivisionError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def try_decode(data: bytes, size: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    """(image, None), or (None, reason) when the bytes do not decode."""
    try:
        return decode_bytes(data, size, channels), None
    except DECODE_ERRORS as error:
        return None, failure_reason(error)


def read_and_decode(path: str, size: int, channels: int) -> tuple[np.ndarray | None, str | None]:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return None, failure_reason(error)
    return try_decode(data, size, channels)
