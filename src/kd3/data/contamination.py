"""Contamination: pool images that copy evaluation images, and duplicates inside the pool.

A pool scraped from the web may hold the very images a student is later tested on, or
lightly edited copies of them (resized, recompressed, brightened, cropped, flipped); a
student trained on those is tested on what it has seen. ``find_contamination`` lists them:

- *exact* copies: byte-identical images (SHA-1 of the uint8 pixels; only between images of
  the same shape);
- *near* copies: copy distance ≤ ``threshold`` grey levels (``kd3.data.copymatch``: candidate
  search over crop/flip variants, then a residual after undoing resampling and brightness).

and, in the pool itself, groups of images that are exact or near copies of each other
(without crops, see ``find_duplicates``). Reports are cached under ``<kd3 cache>/contamination``
keyed by the pool's and the evaluation images' digests and every setting.

Guarantee, and its limit: the candidate search is exact (no approximate index), so a copy is
missed only when its 8×8 thumbnail ranks it below ``top_k`` other evaluation images or below
``PREFILTER`` cosine, or when its distance exceeds the threshold. How often that happens is
measured, per perturbation, in results/contamination.md.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from kd3.data import copymatch
from kd3.data.pool import Pool, atomic_write
from kd3.data.storage import PoolImages, chunks
from kd3.engine.faults import best_effort
from kd3.paths import cache_dir
from kd3.utils.filelock import load_or_build
from kd3.utils.progress import progress

VERSION = 2  # bump when a change alters what a report holds: it invalidates cached reports
THRESHOLD = 5.0  # grey levels; tuned on planted copies of Fashion-MNIST train images (results/contamination.md)
MAX_CROP = 3  # pixels a copy may have been cropped by (then resized back)
TOP_K = 16  # candidates verified per pool image
PREFILTER = 0.85  # thumbnail cosine below which a pool image is not verified at all
RATIO = 0.75  # a copy's distance / its nearest unrelated candidate's, at most (see _near)
# Grey-level std (at half resolution, where distances are measured) below which an image is
# matched only exactly: with a brightness fit, the copy distance between a low-contrast image and
# any other is about the larger std or less, so it would be "near" every other dull image (in the
# default pool 300 flat sky and wall crops chained into one duplicate group before this rule).
MIN_CONTRAST = 2 * THRESHOLD
CHUNK = 1024  # pool images per step: bounded memory whatever the pool's size


class CopyPair(NamedTuple):
    pool_index: int
    eval_index: int
    distance: float  # grey levels; 0 for exact copies
    kind: str  # "exact" or "near"


@dataclass
class Contamination:
    """What ``find_contamination`` found. Pairs are parallel arrays, sorted by pool index."""

    against: str  # what the pool was compared with, e.g. "fashion-mnist:test"
    pool_size: int
    eval_size: int
    threshold: float
    pool_index: np.ndarray  # int64, one entry per (pool image, evaluation image) pair
    eval_index: np.ndarray  # int64
    distance: np.ndarray  # float32 grey levels
    exact: np.ndarray  # bool
    duplicate_groups: list[np.ndarray] = field(default_factory=list)  # in-pool groups, pool indices
    duplicates_searched: bool = True
    seconds: float = 0.0

    @property
    def flagged(self) -> np.ndarray:
        """Sorted pool indices with at least one evaluation copy (what drop_contaminated drops)."""
        return np.unique(self.pool_index)

    @property
    def exact_flagged(self) -> np.ndarray:
        return np.unique(self.pool_index[self.exact])

    def pairs(self) -> Iterator[CopyPair]:
        for i, j, d, e in zip(self.pool_index.tolist(), self.eval_index.tolist(), self.distance.tolist(),
                              self.exact.tolist()):
            yield CopyPair(i, j, d, "exact" if e else "near")

    def summary(self) -> dict:
        """Counts, JSON-ready: what the bench context and a run directory record."""
        exact = len(self.exact_flagged)
        return {"against": self.against, "pool_images": self.pool_size, "eval_images": self.eval_size,
                "threshold": self.threshold, "flagged": len(self.flagged), "exact": exact,
                "near": len(self.flagged) - exact, "pairs": len(self.pool_index),
                "duplicate_groups": len(self.duplicate_groups) if self.duplicates_searched else None,
                "duplicate_images": sum(len(g) for g in self.duplicate_groups) if self.duplicates_searched else None}

    def write_csv(self, path: str | os.PathLike, source: np.ndarray | None = None,
                  style: np.ndarray | None = None, paths: np.ndarray | None = None) -> Path:
        """One row per pair (pool_index, eval_index, kind, distance, and the pool image's source
        and style when given), then one per in-pool duplicate (kind ``pool-duplicate``, the group
        number in the eval_index column's place is ``group``). With ``paths`` (``Pool.paths``) a
        last column, ``path``, names each pool image's file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["kind", "pool_index", "eval_index", "group", "distance", "source", "style"]
                            + (["path"] if paths is not None else []))

            def where(i: int) -> list:
                return ([source[i] if source is not None else "", style[i] if style is not None else ""]
                        + ([paths[i]] if paths is not None else []))

            for pair in self.pairs():
                writer.writerow([pair.kind, pair.pool_index, pair.eval_index, "", f"{pair.distance:.2f}",
                                 *where(pair.pool_index)])
            for number, group in enumerate(self.duplicate_groups):
                for i in group.tolist():
                    writer.writerow(["pool-duplicate", i, "", number, "", *where(i)])
        return path

    # -- cache ------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        groups = self.duplicate_groups
        meta = json.dumps({"against": self.against, "pool_size": self.pool_size, "eval_size": self.eval_size,
                           "threshold": self.threshold, "duplicates_searched": self.duplicates_searched,
                           "seconds": self.seconds})
        atomic_write(path, lambda f: np.savez(
            f, pool_index=self.pool_index, eval_index=self.eval_index, distance=self.distance, exact=self.exact,
            group_members=np.concatenate(groups) if groups else np.zeros(0, np.int64),
            group_sizes=np.array([len(g) for g in groups], dtype=np.int64), meta=np.array(meta)))

    @classmethod
    def load(cls, path: Path) -> Contamination:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            groups = np.split(z["group_members"], np.cumsum(z["group_sizes"])[:-1]) if len(z["group_sizes"]) else []
            return cls(pool_index=z["pool_index"], eval_index=z["eval_index"], distance=z["distance"],
                       exact=z["exact"], duplicate_groups=list(groups), **meta)


# -- exact copies ---------------------------------------------------------------------------------
def digests(images: torch.Tensor) -> list[bytes]:
    """SHA-1 of each image's uint8 pixels (shape included, so equal bytes of other shapes differ)."""
    shape = str(tuple(images.shape[1:])).encode()
    flat = images.reshape(len(images), -1).cpu().numpy()
    return [hashlib.sha1(shape + row.tobytes()).digest() for row in flat]


# -- search -----------------------------------------------------------------------------------------
def _near(queries: torch.Tensor, gallery: copymatch.Gallery, threshold: float, top_k: int,
          exclude: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, gallery index, distance) of every near copy among one chunk's queries.

    A copy must also be *distinct* (Lowe's ratio test): its best candidate B must be nearer than
    ``RATIO`` × the nearest candidate that is not itself a copy of B. A blurred or plain image
    is within the threshold of many look-alikes at once; a copy is near its original (and the
    original's own duplicates, which are reported with it) and clearly farther from the rest."""
    empty = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    sims, candidates = copymatch.search(queries, gallery, top_k, exclude=exclude)
    # The cosine ranks, the distance decides; a dull image is compared exactly only (MIN_CONTRAST).
    contrast = gallery.maps.contrast(queries)
    rows = torch.nonzero((sims[:, 0] >= PREFILTER) & (contrast >= MIN_CONTRAST)).flatten()
    if not len(rows):
        return empty
    distance = copymatch.verify(queries[rows], candidates[rows], gallery)
    distance = distance.masked_fill(gallery.contrast[candidates[rows]] < MIN_CONTRAST, float("inf"))
    distance, order = distance.sort(1)
    candidates = candidates[rows].gather(1, order)
    near = torch.nonzero(distance[:, 0] <= threshold).flatten()
    if not len(near):
        return empty
    rows, distance, candidates = rows[near], distance[near], candidates[near]
    if candidates.shape[1] > 1:
        best = gallery.grey(candidates[:, 0])
        twin = copymatch.verify(best, candidates[:, 1:], gallery) <= threshold
        rival = distance[:, 1:].masked_fill(twin, float("inf")).amin(1)
        distinct = distance[:, 0] <= RATIO * rival
        keep = torch.cat([distinct[:, None], twin & distinct[:, None] & (distance[:, 1:] <= threshold)], 1)
    else:
        keep = torch.ones_like(distance, dtype=torch.bool)
    where = torch.nonzero(keep)
    return (rows[where[:, 0]].cpu().numpy(), candidates[keep].cpu().numpy(),
            distance[keep].cpu().numpy().astype(np.float32))


def find_copies(pool_images: PoolImages, eval_images: torch.Tensor, threshold: float = THRESHOLD,
                max_crop: int = MAX_CROP, top_k: int = TOP_K, device: str = "cpu",
                show_progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (pool index, eval index, distance, exact) pair where the pool image copies the
    evaluation image, sorted by pool index. ``pool_images`` is read ``CHUNK`` images at a time."""
    by_digest: dict[bytes, list[int]] = {}
    for j, digest in enumerate(digests(eval_images)):
        by_digest.setdefault(digest, []).append(j)
    gallery = copymatch.Gallery(chunks(eval_images, CHUNK), max_crop, device)
    found: dict[tuple[int, int], tuple[float, bool]] = {}
    steps = progress(range(0, len(pool_images), CHUNK), desc="contamination", enabled=show_progress,
                     total=-(-len(pool_images) // CHUNK), unit="chunk")
    for start in steps:
        chunk = pool_images[start:start + CHUNK]
        for row, digest in enumerate(digests(chunk)):
            for j in by_digest.get(digest, ()):
                found[(start + row, j)] = (0.0, True)
        rows, matches, distance = _near(copymatch.gray(chunk.to(gallery.device), gallery.size), gallery,
                                        threshold, top_k)
        for row, j, d in zip(rows.tolist(), matches.tolist(), distance.tolist()):
            found.setdefault((start + row, j), (d, False))
    keys = sorted(found)
    return (np.array([k[0] for k in keys], dtype=np.int64), np.array([k[1] for k in keys], dtype=np.int64),
            np.array([found[k][0] for k in keys], dtype=np.float32), np.array([found[k][1] for k in keys], dtype=bool))


def find_duplicates(pool_images: PoolImages, threshold: float = THRESHOLD, top_k: int = TOP_K,
                    device: str = "cpu", show_progress: bool = False) -> list[np.ndarray]:
    """Groups (sorted pool indices, largest group first) of pool images that are exact or near
    copies of one another, crops aside (max_crop 0: a crop search inside the pool would cost 30×).
    The search is pool × pool: quadratic in the pool's size (20k images: seconds; 1M: hours on a
    CPU, so pass ``device="cuda"`` or skip it with ``duplicates=False``)."""
    n = len(pool_images)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        parent[root(i)] = root(j)

    first: dict[bytes, int] = {}
    for start in range(0, n, CHUNK):
        for row, digest in enumerate(digests(pool_images[start:start + CHUNK])):
            join(start + row, first.setdefault(digest, start + row))
    gallery = copymatch.Gallery(chunks(pool_images, CHUNK), max_crop=0, device=device)
    steps = progress(range(0, n, CHUNK), desc="pool duplicates", enabled=show_progress, total=-(-n // CHUNK),
                     unit="chunk")
    for start in steps:
        ids = torch.arange(start, min(start + CHUNK, n), device=gallery.device)
        rows, matches, _ = _near(gallery.grey(ids), gallery, threshold, top_k, exclude=ids)
        for row, j in zip(rows.tolist(), matches.tolist()):
            join(start + row, j)
    roots = np.array([root(i) for i in range(n)])
    _, inverse, counts = np.unique(roots, return_inverse=True, return_counts=True)
    groups = [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts > 1)]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def find_contamination(pool_images: PoolImages, eval_images: torch.Tensor, against: str,
                       threshold: float = THRESHOLD, duplicates: bool = True, device: str = "cpu",
                       show_progress: bool = False) -> Contamination:
    """Copies of ``eval_images`` in the pool, and (with ``duplicates``) duplicate groups in it."""
    started = time.perf_counter()
    pool_index, eval_index, distance, exact = find_copies(pool_images, eval_images, threshold, device=device,
                                                          show_progress=show_progress)
    groups = find_duplicates(pool_images, threshold, device=device, show_progress=show_progress) if duplicates else []
    return Contamination(against=against, pool_size=len(pool_images), eval_size=len(eval_images),
                         threshold=threshold, pool_index=pool_index, eval_index=eval_index, distance=distance,
                         exact=exact, duplicate_groups=groups, duplicates_searched=duplicates,
                         seconds=time.perf_counter() - started)


# -- pools ------------------------------------------------------------------------------------------
def _cache_path(pool: Pool, against: str, eval_images: torch.Tensor, threshold: float, duplicates: bool) -> Path:
    evaluation = hashlib.sha256(eval_images.numpy().tobytes()).hexdigest()
    key = json.dumps({"version": VERSION, "pool": pool.digest(), "against": against, "eval": evaluation,
                      "threshold": threshold, "max_crop": MAX_CROP, "top_k": TOP_K, "prefilter": PREFILTER, "ratio": RATIO,
                      "min_contrast": MIN_CONTRAST,
                      "duplicates": duplicates}, sort_keys=True)
    return cache_dir() / "contamination" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def pool_contamination(pool: Pool, against: str, threshold: float = THRESHOLD, duplicates: bool = True,
                       device: str = "cpu", show_progress: bool = False, cache: bool = True) -> Contamination:
    """``find_contamination`` of a pool against labelled images, cached: a built-in ``NAME:SPLIT``, or
    the user's own (a class-folder directory, .csv or .npz; ``kd3.data.labelled``), decoded to the
    pool's channels and size."""
    eval_images = evaluation_images(against, tuple(pool.images.shape[1:]), show_progress)
    path = _cache_path(pool, against, eval_images, threshold, duplicates)

    def compute() -> Contamination:
        report = find_contamination(pool.images, eval_images, against, threshold, duplicates, device, show_progress)
        if cache:
            with best_effort(path, "the contamination report (it is recomputed next time)"):
                report.save(path)
        return report

    if not cache:
        return compute()
    return load_or_build(path, _cached, compute)


def evaluation_images(against: str, pool_shape: tuple[int, ...], show_progress: bool = False) -> torch.Tensor:
    """The images ``against`` names; own image files decoded to ``pool_shape`` (C×H×W), a built-in
    source as it is (copies are compared in grey at the evaluation images' size anyway)."""
    from kd3.data.labelled import load_labelled

    channels, size = int(pool_shape[0]), int(pool_shape[-1])
    return load_labelled(against, size, channels, show_progress=show_progress).images


def _cached(path: Path) -> Contamination | None:
    if not path.is_file():
        return None
    try:
        return Contamination.load(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # unreadable (e.g. a disk that filled mid-write): computed again and overwritten


def drop_contaminated(pool: Pool, report: Contamination) -> Pool:
    """The pool without every image ``report`` flags (exact or near copy of an evaluation image);
    its meta records what was dropped."""
    if report.pool_size != len(pool):
        raise ValueError(f"the contamination report covers {report.pool_size} images, the pool has {len(pool)}")
    keep = np.setdiff1d(np.arange(len(pool)), report.flagged)
    kept = pool.subset(keep)
    summary = report.summary()
    kept.meta["contamination_dropped"] = {k: summary[k] for k in ("against", "threshold", "flagged", "exact", "near")}
    return kept
