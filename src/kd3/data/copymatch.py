"""Is pool image P a copy of image E? The image-level half of contamination search.

A copy here is E after any of: resize down and back up, JPEG recompression, a brightness or
contrast change (with clipping), a crop of a few pixels resized back, a horizontal flip.

Why not a perceptual hash alone: on Fashion-MNIST a 64-bit DCT hash cannot tell a copy from a
look-alike. Two different trousers are as close in hash (and in any global descriptor) as a
trouser and its own 2-pixel crop; with 10k evaluation images every pool trouser has a
"near copy" (measured in results/contamination.md). What does separate them is the pixels: a
copy is E re-rendered, so once the right geometry, resampling and brightness are undone the
residual is a few grey levels, while a look-alike differs by 10-20. So kd3 finds copies in two
steps:

1. ``Gallery`` / ``search``: candidates. Each gallery image is expanded into its geometric
   variants (crops of 0..``max_crop`` pixels resized back, each also flipped) and each variant
   summarised by an 8×8 thumbnail, zero mean and unit norm (so brightness and contrast drop
   out). A query's candidates are the ``top_k`` gallery images by best cosine over variants:
   an exact search by matrix products in chunks (no approximate index, so nothing is missed
   that the thumbnail ranks in the top ``top_k``).
2. ``verify``: the copy distance of each candidate: the smallest, over its best-ranked
   variants and over re-sampling it down to ``RESAMPLE`` of its side and back, of the RMS
   residual between P and clip(a·E' + b) (a, b fitted by least squares on P's unclipped
   pixels, so a brightness shift that saturated pixels still fits exactly), measured at half
   resolution (so JPEG's block noise and resampler differences mostly cancel). In grey levels
   of E (the residual is divided by a when a < 1: a faint image is not near everything).

Everything is torch on uint8 N×C×H×W input, converted to grey (ITU-R 601 luma, as PIL's "L")
at the gallery's height and width. Every resampling (crop and resize back, thumbnail, down and
up, half resolution) is linear, so each is a pair of small matrices applied by batched matrix
products (``Maps``): the same numbers as ``F.interpolate`` per image, at a fraction of its cost.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F

THUMB = 8  # thumbnail side of the candidate search
RESAMPLE = (0.5, 0.6, 0.7, 0.8)  # down-and-up resamplings a copy may have gone through
LUMA = (0.299, 0.587, 0.114)
VARIANTS_VERIFIED = 4  # best-ranked variants of each candidate that verification tries


def gray(images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 N×C×H×W -> float N×H×W in grey levels (0..255), resized to ``size`` if given."""
    x = images.float()
    if x.shape[1] == 3:
        x = torch.tensordot(x, torch.tensor(LUMA, device=x.device), dims=([1], [0]))[:, None]
    elif x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0]


@dataclass(frozen=True)
class Variant:
    crop: int  # pixels removed in each direction (the crop is (H - crop) × (W - crop))
    top: int
    left: int
    flip: bool


def variants(max_crop: int) -> list[Variant]:
    """The identity first, then every crop of 1..max_crop pixels at every offset, each also flipped."""
    return [Variant(c, t, left, flip) for c in range(max_crop + 1) for t, left in product(range(c + 1), repeat=2)
            for flip in (False, True)]


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """n_out × n_in: 1-D bilinear resizing as ``F.interpolate`` does it (antialiased when shrinking)."""
    eye = torch.eye(n_in)[:, None, None, :]  # n_in one-pixel rows
    out = F.interpolate(eye, size=(1, n_out), mode="bilinear", antialias=n_out < n_in, align_corners=False)
    return out[:, 0, 0, :].T.contiguous()


def _crop_matrix(n: int, crop: int, offset: int, flip: bool) -> torch.Tensor:
    """n × n: keep pixels offset .. offset + n - crop, resize back to n, optionally mirror."""
    matrix = torch.zeros(n, n)
    matrix[:, offset:offset + n - crop] = resize_matrix(n - crop, n)
    return matrix.flip(0) if flip else matrix


def apply(rows: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ x @ colsᵀ, batched over any leading dimensions."""
    return rows @ x @ cols.transpose(-1, -2)


class Maps:
    """The linear maps of one image size: variants (V×H×H, V×W×W), thumbnails of each variant
    (V×8×H, V×8×W), down-and-up resamplings (R×H×H, R×W×W, the identity first) and halving."""

    def __init__(self, size: tuple[int, int], max_crop: int, device: torch.device):
        h, w = size
        if min(h, w) <= max_crop + 1:
            raise ValueError(f"images of {h}×{w} pixels are too small for crops of {max_crop}")
        self.variants = variants(max_crop)
        self.rows = torch.stack([_crop_matrix(h, v.crop, v.top, False) for v in self.variants]).to(device)
        self.cols = torch.stack([_crop_matrix(w, v.crop, v.left, v.flip) for v in self.variants]).to(device)
        self.thumb_rows = resize_matrix(h, THUMB).to(device) @ self.rows
        self.thumb_cols = resize_matrix(w, THUMB).to(device) @ self.cols

        def down_up(n: int, fraction: float) -> torch.Tensor:
            small = max(round(n * fraction), 1)
            return resize_matrix(small, n) @ resize_matrix(n, small)

        self.resample_rows = torch.stack([torch.eye(h)] + [down_up(h, f) for f in RESAMPLE]).to(device)
        self.resample_cols = torch.stack([torch.eye(w)] + [down_up(w, f) for f in RESAMPLE]).to(device)
        self.half_rows = resize_matrix(h, max(h // 2, 1)).to(device)
        self.half_cols = resize_matrix(w, max(w // 2, 1)).to(device)

    def contrast(self, x: torch.Tensor) -> torch.Tensor:
        """float N×H×W -> N grey-level std at half resolution, where copy distances are measured."""
        return apply(self.half_rows, x, self.half_cols).flatten(1).std(1)

    def thumbnails(self, x: torch.Tensor, every_variant: bool = True) -> torch.Tensor:
        """float N×H×W -> N×V×64 zero-mean, unit-norm thumbnails of every variant (or N×1×64, of
        the image as it is); a flat image gets zeros."""
        rows, cols = (self.thumb_rows, self.thumb_cols) if every_variant else (self.thumb_rows[:1], self.thumb_cols[:1])
        t = apply(rows, x[:, None], cols).flatten(2)
        return F.normalize(t - t.mean(2, keepdim=True), dim=2)


class Gallery:
    """The images copies are looked for among (the evaluation set, or the pool itself): their
    grey levels (uint8, rounded: at most half a grey level off for colour images) and the
    thumbnails of all their variants (10k images × 60 variants × 64 floats: 154 MB)."""

    def __init__(self, chunks: Iterable[torch.Tensor], max_crop: int, device: torch.device | str = "cpu",
                 size: tuple[int, int] | None = None):
        self.device = torch.device(device)
        grey, thumbs, contrast = [], [], []
        self.maps: Maps | None = None
        for chunk in chunks:
            block = gray(chunk.to(self.device), size)
            if self.maps is None:
                size = tuple(block.shape[-2:])
                self.maps = Maps(size, max_crop, self.device)
            grey.append(block.round().to(torch.uint8))
            thumbs.append(self.maps.thumbnails(block))
            contrast.append(self.maps.contrast(block))
        if self.maps is None:
            raise ValueError("no images to search among")
        self.images = torch.cat(grey)
        self.thumbs = torch.cat(thumbs)  # M×V×64
        self.contrast = torch.cat(contrast)  # M

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def grey(self, rows: torch.Tensor) -> torch.Tensor:
        return self.images[rows].float()


def search(queries: torch.Tensor, gallery: Gallery, top_k: int, block: int = 2048,
           exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine over variants of each query's ``top_k`` nearest gallery images: (n×k sims,
    n×k gallery indices), by exact matrix products over gallery blocks. ``exclude`` (n gallery
    indices) removes each query's own entry when the gallery is the pool itself."""
    q = gallery.maps.thumbnails(queries, every_variant=False)[:, 0]
    n, k = len(q), min(top_k, len(gallery))
    best = torch.full((n, k), -2.0, device=q.device)
    index = torch.zeros((n, k), dtype=torch.long, device=q.device)
    for start in range(0, len(gallery), block):
        g = gallery.thumbs[start:start + block]  # b×V×64
        sims = (q @ g.flatten(0, 1).T).view(n, len(g), -1).amax(2)
        ids = torch.arange(start, start + len(g), device=q.device)
        if exclude is not None:
            sims = sims.masked_fill(ids[None] == exclude[:, None], -2.0)
        best, where = torch.cat([best, sims], 1).topk(k, dim=1)
        index = torch.cat([index, ids.expand(n, -1)], 1).gather(1, where)
    return best, index


def _fit_residual(p: torch.Tensor, e: torch.Tensor, maps: Maps) -> torch.Tensor:
    """p: m×H×W, e: m×R×H×W -> m×R half-resolution RMS of p - clip(a·e + b) (least squares a, b
    on p's pixels that are not saturated; a kept within [0.5, 2], a plausible contrast change),
    divided by a when a < 1."""
    m, r = e.shape[:2]
    P, E = p.reshape(m, -1), e.reshape(m, r, -1)
    mask = ((P > 0.5) & (P < 254.5)).float()
    count = mask.sum(1, keepdim=True).clamp_min(1.0)
    # Least squares in sums (pixel-space matrix products), not in centred temporaries: 3× faster.
    sx = torch.einsum("mrp,mp->mr", E, mask)
    sxx = torch.einsum("mrp,mp->mr", E * E, mask)
    sxy = torch.einsum("mrp,mp->mr", E, mask * P)
    sy = (mask * P).sum(1, keepdim=True)
    a = ((sxy - sx * sy / count) / (sxx - sx * sx / count).clamp_min(1e-6)).clamp(0.5, 2.0)
    b = (sy - a * sx) / count
    predicted = torch.addcmul(b[..., None, None], a[..., None, None], e).clamp_(0, 255)
    low_p = apply(maps.half_rows, p[:, None], maps.half_cols)
    low_e = apply(maps.half_rows, predicted, maps.half_cols)
    # In E's grey levels when P is fainter: else a faint P would be near everything by being faint.
    return (low_e - low_p).flatten(2).pow(2).mean(2).sqrt() / a.clamp_max(1.0)


def verify(queries: torch.Tensor, candidates: torch.Tensor, gallery: Gallery, batch: int = 64) -> torch.Tensor:
    """Copy distance (grey levels, see the module docstring) of each query to each of its
    candidates: queries n×H×W, candidates n×k gallery indices -> n×k.

    The best-ranked ``VARIANTS_VERIFIED`` variants of every candidate are tried as they are, and
    the best-ranked one also resampled down and up: trying every resampling of every variant
    would cost 4× more, and the thumbnail, blind to blur, ranks a resized copy's geometry well."""
    maps = gallery.maps
    n, k = candidates.shape
    out = torch.empty((n, k), device=queries.device)
    for start in range(0, n, batch):
        cand, p = candidates[start:start + batch], queries[start:start + batch]
        m = len(cand)
        # Rank all variants of each candidate by thumbnail; render the best few in full.
        q = maps.thumbnails(p, every_variant=False)[:, 0]  # m×64
        ranks = torch.einsum("nd,nkvd->nkv", q, gallery.thumbs[cand])
        chosen = ranks.topk(min(VARIANTS_VERIFIED, ranks.shape[2]), dim=2).indices  # m×k×c
        images = gallery.grey(cand)[:, :, None]  # m×k×1×H×W
        rendered = apply(maps.rows[chosen], images, maps.cols[chosen])  # m×k×c×H×W
        resampled = apply(maps.resample_rows[1:], rendered[:, :, :1], maps.resample_cols[1:])  # m×k×(R-1)×H×W
        options = torch.cat([rendered, resampled], 2)
        distance = _fit_residual(p, options.flatten(1, 2), maps).view(m, k, -1)
        out[start:start + m] = distance.amin(2)
    return out
