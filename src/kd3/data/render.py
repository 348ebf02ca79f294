"""Characters rendered from the TrueType fonts matplotlib ships (offline on every machine).

Used for printed digits (relevant in digits-wild), letters and glyphs (irrelevant). Glyphs are
drawn white on black, like MNIST and Fashion-MNIST, at 4× resolution and then downsampled, so
strokes are anti-aliased the way scanned digits are.
"""
from __future__ import annotations

import functools
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Fonts whose ASCII code points draw ordinary letters and digits. matplotlib also ships math
# and symbol fonts (cmex10, cmsy10, STIXSiz*, STIXNonUni*) that map them to other symbols,
# cmmi10 (old-style digits) and LastResort (boxes); those would mislabel rendered digits.
_TEXT_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
)

DIGITS = string.digits
# Letters a digit classifier could fairly call a digit (O/0, l/1, Z/2, S/5, b/6, q/9, B/8, ...)
# are left out, so "irrelevant" letters are irrelevant.
LETTERS = "".join(c for c in string.ascii_letters if c not in "OoQDIlijZzSsBbGgq")
GLYPHS = string.ascii_letters + string.digits + "#$%&@*+=?!<>{}[]()/\\~^"

_OVERSAMPLE = 4


@functools.lru_cache(maxsize=1)
def text_fonts() -> tuple[Path, ...]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = tuple(folder / name for name in _TEXT_FONTS if (folder / name).is_file())
    if not fonts:
        raise FileNotFoundError(f"no TrueType fonts in {folder}; reinstall matplotlib")
    return fonts


@functools.lru_cache(maxsize=512)
def _font(path: Path, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), px)


def _draw(char: str, font: ImageFont.FreeTypeFont, canvas: int, center: tuple[float, float],
          stroke: int, angle: float) -> Image.Image:
    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).text(center, char, fill=255, font=font, anchor="mm",
                             stroke_width=stroke, stroke_fill=255)
    return img.rotate(angle, resample=Image.BILINEAR, center=center) if angle else img


def render_centered(chars: Sequence[str], rng: np.random.Generator, size: int = 28,
                    box: tuple[int, int] = (16, 22), max_angle: float = 15.0) -> np.ndarray:
    """Printed characters framed like MNIST: random font, stroke width and rotation, the ink's
    bounding box scaled so its longer side spans ``box`` pixels, centred. -> uint8 N×1×S×S."""
    fonts = text_fonts()
    big = size * _OVERSAMPLE
    out = np.zeros((len(chars), 1, size, size), dtype=np.uint8)
    for i, char in enumerate(chars):
        font = _font(fonts[rng.integers(len(fonts))], big // 2)
        stroke = int(rng.integers(0, 4))  # in oversampled pixels: 0 to ~1 final pixel
        angle = rng.uniform(-max_angle, max_angle)
        # A half-frame-high glyph rotated by ≤ 15° fits in 1.5 frames around its centre.
        canvas = big * 3 // 2
        center = (canvas / 2, canvas / 2)
        img = _draw(char, font, canvas, center, stroke, angle)
        bbox = img.getbbox()
        if bbox is None:  # a font lacking this glyph: DejaVu Sans has every one we use
            img = _draw(char, _font(fonts[0], big // 2), canvas, center, stroke, angle)
            bbox = img.getbbox()
        ink = img.crop(bbox)
        side = rng.uniform(*box)
        scale = side / max(ink.size)
        w, h = max(1, round(ink.size[0] * scale)), max(1, round(ink.size[1] * scale))
        small = ink.resize((w, h), resample=Image.LANCZOS)
        frame = Image.new("L", (size, size), 0)
        frame.paste(small, ((size - w) // 2, (size - h) // 2))
        out[i, 0] = np.asarray(frame)
    return out


def render_scattered(chars: Sequence[str], rng: np.random.Generator,
                     size: int = 28) -> np.ndarray:
    """Characters at random font, size (0.4–1.2× the frame), position and rotation, possibly
    running off the edge, like text fragments cut out of a web page. -> uint8 N×1×S×S."""
    fonts = text_fonts()
    big = size * _OVERSAMPLE
    out = np.zeros((len(chars), 1, size, size), dtype=np.uint8)
    for i, char in enumerate(chars):
        px = int(big * rng.uniform(0.4, 1.2)) // 8 * 8  # coarse sizes keep the font cache small
        font = _font(fonts[rng.integers(len(fonts))], max(px, 8))
        center = tuple(rng.uniform(0.25 * big, 0.75 * big, size=2))
        img = _draw(char, font, big, center, int(rng.integers(0, 4)), rng.uniform(-30, 30))
        out[i, 0] = np.asarray(img.resize((size, size), resample=Image.BOX))
    return out
