"""Style shifts for relevant web images: batched, on uint8 N×C×H×W arrays, seeded by a Generator.

Default styles stay recognisable (a person still names the class), like the paper's sketches
and cartoons of the right animals; the "hard" ones (negative, mnistm) are shifts a teacher
trained on clean images mostly gets wrong while staying confident.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_STYLES = ("sketch", "lowres", "blend", "contrast", "clean")
HARD_STYLES = ("negative", "mnistm")
STYLES = DEFAULT_STYLES + HARD_STYLES
NEEDS_PATCHES = frozenset({"blend", "mnistm"})  # styles that mix in a natural-image patch

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def _uint8(x: torch.Tensor) -> np.ndarray:
    return x.round().clamp_(0, 255).to(torch.uint8).numpy()


def clean(x: np.ndarray) -> np.ndarray:
    return x.copy()


def sketch(x: np.ndarray) -> np.ndarray:
    """Sobel edge magnitude, bright edges on a dark background (Fashion-MNIST's polarity).

    Each image is scaled so its 99th-percentile edge is white: outlines stay strong whatever
    the garment's brightness, while one hot pixel cannot dim the rest.
    """
    n, c, h, w = x.shape
    flat = _float(x).reshape(n * c, 1, h, w)
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None]
    grad = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), kernels)
    mag = grad.pow(2).sum(1).sqrt().reshape(n, c, h * w)
    scale = torch.quantile(mag, 0.99, dim=2, keepdim=True).clamp_min(1e-6)
    return _uint8((mag / scale * 255).reshape(n, c, h, w))


def lowres(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Downsample each image by ×2 or ×4 (area average), then upsample back (bilinear)."""
    out = np.empty_like(x)
    factors = rng.choice([2, 4], size=len(x))
    h, w = x.shape[2:]
    for factor in (2, 4):
        idx = np.flatnonzero(factors == factor)
        if len(idx) == 0:
            continue
        small = F.interpolate(_float(x[idx]), size=(h // factor, w // factor), mode="area")
        out[idx] = _uint8(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))
    return out


def blend(x: np.ndarray, patches: np.ndarray, alpha: float = 0.3) -> np.ndarray:
    """(1 − alpha)·x + alpha·patch: the object over a faint natural-image background."""
    return _uint8((1 - alpha) * _float(x) + alpha * _float(patches))


def contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random gamma in [0.6, 1.6], then contrast scaled by [0.6, 1.4] around the image mean."""
    n = len(x)
    gamma = torch.from_numpy(rng.uniform(0.6, 1.6, size=(n, 1, 1, 1))).float()
    gain = torch.from_numpy(rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))).float()
    y = (_float(x) / 255).pow(gamma)
    mean = y.mean((1, 2, 3), keepdim=True)
    return _uint8(((y - mean) * gain + mean) * 255)


def negative(x: np.ndarray) -> np.ndarray:
    return 255 - x


def mnistm(x: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """|x − patch|, the MNIST-M construction: the object inverts a natural-image background."""
    return np.abs(x.astype(np.int16) - patches.astype(np.int16)).astype(np.uint8)


def apply_style(style: str, x: np.ndarray, rng: np.random.Generator,
                patches: np.ndarray | None = None) -> np.ndarray:
    """Apply ``style`` to a batch; ``patches`` (same shape as ``x``) feed blend and mnistm."""
    if style in NEEDS_PATCHES:
        if patches is None or patches.shape != x.shape:
            raise ValueError(f"style {style!r} needs natural patches shaped like the images "
                             f"{x.shape}")
        return blend(x, patches) if style == "blend" else mnistm(x, patches)
    if style == "lowres":
        return lowres(x, rng)
    if style == "contrast":
        return contrast(x, rng)
    plain = {"clean": clean, "sketch": sketch, "negative": negative}
    if style not in plain:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    return plain[style](x)
