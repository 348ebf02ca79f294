"""Planted copies: evaluation images slipped into a pool, as is or lightly edited, so a
contamination finder's recall can be measured (tests, benchmarks/contamination.py).

The edits are made with Pillow, the way a web pipeline makes them, not with the torch
resampling ``kd3.data.copymatch`` undoes, so a finder cannot pass by mirroring its own code.
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from kd3.data.pool import Pool

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]


def _resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down to 50-80% of the side, then back up (bilinear both ways)."""
    fraction = rng.uniform(0.5, 0.8)
    small = (max(1, round(img.width * fraction)), max(1, round(img.height * fraction)))
    return img.resize(small, Image.BILINEAR).resize(img.size, Image.BILINEAR)


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Recompressed as JPEG at quality 50-90."""
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=int(rng.integers(50, 91)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert(img.mode)


def _brightness(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Every pixel ±20-40 grey levels, clipped to 0..255."""
    shift = int(rng.integers(20, 41)) * (1 if rng.random() < 0.5 else -1)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + shift, 0, 255).astype(np.uint8))


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """1-3 pixels cut off (split between the two sides at random), then resized back."""
    cut = int(rng.integers(1, 4))
    left, top = (int(v) for v in rng.integers(0, cut + 1, size=2))
    box = (left, top, left + img.width - cut, top + img.height - cut)
    return img.crop(box).resize(img.size, Image.BILINEAR)


def _flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT)


EDITS: dict[str, Edit] = {"resize": _resize, "jpeg": _jpeg, "brightness": _brightness, "crop": _crop, "flip": _flip}


def edit(image: torch.Tensor, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """uint8 C×H×W (C = 1 or 3) -> the same image after edit ``kind`` (a key of EDITS, or
    several joined by "+", applied left to right)."""
    array = image.numpy()
    img = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    for name in kind.split("+"):
        img = EDITS[name](img, rng)
    out = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy((out[None] if out.ndim == 2 else out.transpose(2, 0, 1)).copy())


def plant_copies(pool: Pool, eval_images: torch.Tensor, exact: int, edited: int, rng: np.random.Generator,
                 kinds: list[str] | None = None) -> tuple[Pool, np.ndarray, np.ndarray, list[str]]:
    """``pool`` with ``exact`` unedited and ``edited`` edited copies of distinct random evaluation
    images appended (edits cycle through ``kinds``, default every EDITS key). Returns the new
    pool, the copies' pool positions, their evaluation indices and each copy's edit ("exact"
    for unedited). The copies carry source "planted" and are not relevant."""
    kinds = kinds or list(EDITS)
    chosen = rng.choice(len(eval_images), exact + edited, replace=False)
    labels = ["exact"] * exact + [kinds[i % len(kinds)] for i in range(edited)]
    copies = torch.stack([eval_images[j].clone() if kind == "exact" else edit(eval_images[j], kind, rng)
                          for j, kind in zip(chosen.tolist(), labels)])
    n = len(copies)
    planted = Pool(images=torch.cat([pool.images[:], copies]),
                   source=np.concatenate([pool.source.astype(str), np.full(n, "planted")]),
                   style=np.concatenate([pool.style.astype(str), np.array(labels)]),
                   relevant=np.concatenate([pool.relevant, np.zeros(n, dtype=bool)]),
                   true_label=np.concatenate([pool.true_label, np.full(n, -1, dtype=np.int64)]),
                   meta={**pool.meta, "planted": n})
    return planted, np.arange(len(pool), len(pool) + n), chosen, labels
