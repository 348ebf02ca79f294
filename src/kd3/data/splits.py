"""Exact integer allocation and deterministic stratified splits.

Benchmark splits decide which images a teacher may see (O) and which may reach the web pool
(R), so they must never change between runs, processes or library versions. numpy's
``Generator`` promises no stream stability across numpy releases, so splits order images by a
SHA-256 of ``(key, index)`` instead, where the key names the split and its seed: the same
order on every machine and every version.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np


def allocate(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Split ``total`` into integer counts proportional to ``weights`` that sum exactly to it.

    Largest-remainder (Hamilton) rounding: every key gets the floor of its exact share, and the
    units left over go to the largest fractional parts; ties go to the key listed first, so the
    result is a pure function of the mapping's order.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must be >= 0, got {dict(weights)}")
    weight_sum = float(sum(weights.values()))
    if weight_sum <= 0:
        raise ValueError(f"weights must have a positive sum, got {dict(weights)}")
    keys = list(weights)
    exact = [total * weights[k] / weight_sum for k in keys]
    counts = [int(np.floor(e)) for e in exact]
    leftover = total - sum(counts)
    # Stable sort on the remainder: equal remainders keep the mapping's order.
    by_remainder = sorted(range(len(keys)), key=lambda i: -(exact[i] - counts[i]))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    return dict(zip(keys, counts))


def hash_order(indices: Sequence[int] | np.ndarray, key: str) -> np.ndarray:
    """Return ``indices`` sorted by SHA-256 of ``f"{key}:{index}"``: a version-proof shuffle."""
    indices = np.asarray(indices, dtype=np.int64)
    keys = [hashlib.sha256(f"{key}:{i}".encode()).digest() for i in indices.tolist()]
    return indices[np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)]


def stratified_split(labels: np.ndarray, n_held: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)-1`` into (kept, held), with ``len(held) == n_held``.

    Each class contributes to ``held`` in proportion to its size (largest-remainder rounding,
    so the total is exact); within a class the held images are the first in ``hash_order(key)``.
    Give every split its own ``key`` so that nested splits are not correlated.
    Both outputs are sorted ascending.
    """
    labels = np.asarray(labels)
    if not 0 <= n_held <= len(labels):
        raise ValueError(f"cannot hold out {n_held} of {len(labels)} items")
    classes, sizes = np.unique(labels, return_counts=True)
    quotas = allocate({str(c): int(n) for c, n in zip(classes, sizes)}, n_held)
    held = [
        hash_order(np.flatnonzero(labels == c), key)[: quotas[str(c)]] for c in classes
    ]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx.astype(np.int64)
