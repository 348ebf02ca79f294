"""Decode one web image (a file or the bytes of a tar member) into a uint8 C×size×size array.

What a web image becomes, step by step (each step that changes an image is counted under a
``CONVERSIONS`` name, for the ingest summary):

- EXIF orientation is applied first (phone photos store their rotation there): "EXIF rotated".
- Deep pixels become 8 bits. 16-bit images (PNG and TIFF grey ``I;16``, 16-bit RGB(A) and grey
  with alpha) keep their high byte, ``v >> 8``: that is what Pillow itself does to 16-bit RGB(A)
  PNGs, so the grey and the colour 16-bit file of one picture give the same pixels, and an 8-bit
  image widened the usual way (``v * 257``) comes back exactly; it is at most one level below
  ``round(v / 257)``. Pillow's own ``I;16 → L`` conversion would clip everything above 255 to white
  instead. Float (``F``) pixels in [0, 1] become ``round(255 v)`` (kd3's convention for float
  images); float pixels outside [0, 1] and 32-bit integer pixels have no agreed white level, so
  they are skipped under the reasons ``FLOAT_RANGE`` and ``INT32`` rather than stretched to a
  contrast of kd3's invention: "16-bit scaled", "float scaled".
- Transparency (RGBA, LA, PA, palette images with a transparent colour) is composited onto a
  uniform background, the ``alpha`` policy (``ALPHA_BACKGROUNDS``): white by default (web images
  with transparency are mostly drawn on white pages), black for dark-on-transparent images such
  as icons or glyphs meant for dark backgrounds: "alpha composited". The colour stored under
  fully transparent pixels is arbitrary, so there is no "keep what is stored" policy.
- Palette images go through RGBA ("palette converted"), CMYK through Pillow's ICC-less formula
  ("CMYK converted"), then the image becomes grey or RGB ("grey to RGB", "RGB to grey").
- Shorter side to ``size``, centre crop ("resized" when the image was not size×size already).

This module is what ingest's worker processes import, so it imports only numpy and Pillow:
a worker starts in a fraction of a second and never initialises torch.
"""
from __future__ import annotations

import io
import re
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# A web thumbnail has well under this many pixels; a file that claims more is a decompression
# bomb or a mistake, and decoding it would stall a worker for seconds.
MAX_PIXELS = 40_000_000
# What transparent pixels are composited onto (``--alpha`` of ``kd3 data ingest``).
ALPHA_BACKGROUNDS = {"white": (255, 255, 255, 255), "black": (0, 0, 0, 255), "grey": (128, 128, 128, 255)}
DEFAULT_ALPHA = "white"
# Every conversion ``decode_bytes`` counts, in the order it makes them.
CONVERSIONS = ("EXIF rotated", "16-bit scaled", "float scaled", "palette converted", "alpha composited", "CMYK converted",
               "grey to RGB", "RGB to grey", "resized")
INT32 = "32-bit integer pixels"  # skip reasons of pixels kd3 does not turn into 8 bits
FLOAT_RANGE = "float pixels outside [0, 1]"
_GREY_MODES = frozenset({"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# A decoder's raw mode for 16 bits per sample (PNG "I;16B", "RGB;16B", "LA;16B"; TIFF "I;16", ...);
# BMP's "BGR;16" is 5-6-5 packed 8-bit colour, not a deep image.
_DEEP_RAWMODE = re.compile(r"(I|L|LA|RGB|RGBA|RGBX|CMYK);16[BLNS]?")


class UnsupportedPixels(ValueError):
    """Pixels that have no agreed 8-bit meaning; the message is the reason the image is skipped under."""


def check_alpha(alpha: str) -> str:
    """``alpha`` when it names a background of ``ALPHA_BACKGROUNDS``; else ValueError naming them."""
    if alpha not in ALPHA_BACKGROUNDS:
        raise ValueError(f"alpha {alpha!r} is not a background kd3 composites transparent pixels onto: "
                         f"give one of {', '.join(ALPHA_BACKGROUNDS)}")
    return alpha


def _stored_16bit(img: Image.Image) -> bool:
    """Whether the file stores 16 bits per sample (its decoder's raw mode; read before ``load``)."""
    for tile in img.tile:
        args = tile[3]
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(rawmode, str) and _DEEP_RAWMODE.fullmatch(rawmode):
            return True
    return False


def _eight_bits(img: Image.Image, deep: bool, made: list[str]) -> Image.Image:
    """``img`` with 8-bit samples (see the module docstring); raises ``UnsupportedPixels``."""
    if img.mode.startswith("I;16") or (img.mode == "I" and deep):
        made.append("16-bit scaled")
        high = np.asarray(img).astype(np.int64) >> 8  # uint16 of either byte order, or int32 holding 16-bit values
        return Image.fromarray(np.clip(high, 0, 255).astype(np.uint8))
    if img.mode == "I":
        raise UnsupportedPixels(INT32)
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise UnsupportedPixels(FLOAT_RANGE)
        made.append("float scaled")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8))
    if deep:
        made.append("16-bit scaled")  # 16-bit RGB(A) and LA: Pillow's decoder already kept the high byte
    return img


def decode_bytes(data: bytes, size: int, channels: int, alpha: str = DEFAULT_ALPHA,
                 conversions: Counter[str] | None = None) -> np.ndarray:
    """Decode, orient, reduce to 8 bits, composite alpha onto the ``alpha`` background, convert,
    cover-resize to size×size (the module docstring says how). The conversions made are added to
    ``conversions`` once the image has decoded whole."""
    made: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}×{img.height} pixels")
            deep = _stored_16bit(img)
            resized = img.size != (size, size)
            # JPEG can decode straight to a smaller scale (DCT scaling): big photos cost little.
            img.draft(img.mode, (size, size))
            if img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
                made.append("EXIF rotated")
            img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
            grey = img.mode in _GREY_MODES
            img = _eight_bits(img, deep, made)
            if img.mode in ("RGBA", "LA", "P", "PA"):
                if img.mode.startswith("P"):
                    made.append("palette converted")
                if img.mode != "P" or "transparency" in img.info:
                    made.append("alpha composited")
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, ALPHA_BACKGROUNDS[alpha]), rgba)
            elif img.mode == "CMYK":
                made.append("CMYK converted")
            if grey != (channels == 1):
                made.append("grey to RGB" if grey else "RGB to grey")
            img = img.convert("L" if channels == 1 else "RGB")
            # Shorter side to `size`, then a centre crop: what ImageOps.fit does in one step.
            img = ImageOps.fit(img, (size, size), method=Image.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    if resized:
        made.append("resized")
    if conversions is not None:
        conversions.update(made)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def failure_reason(error: BaseException) -> str:
    """The per-reason bucket an ingest report counts a file under."""
    if isinstance(error, UnsupportedPixels):
        return str(error)
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


def try_decode(data: bytes, size: int, channels: int, alpha: str = DEFAULT_ALPHA,
               conversions: Counter[str] | None = None) -> tuple[np.ndarray | None, str | None]:
    """(image, None), or (None, reason) when the bytes do not decode; ``decode_bytes`` counts the
    conversions of an image that decodes in ``conversions``."""
    try:
        return decode_bytes(data, size, channels, alpha, conversions), None
    except DECODE_ERRORS as error:
        return None, failure_reason(error)


def read_and_decode(path: str, size: int, channels: int, alpha: str = DEFAULT_ALPHA,
                    conversions: Counter[str] | None = None) -> tuple[np.ndarray | None, str | None]:
    """``try_decode`` of the file ``path``; (None, reason) when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return None, failure_reason(error)
    return try_decode(data, size, channels, alpha, conversions)
