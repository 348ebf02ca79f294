"""How well a relevance score separates relevant from irrelevant pool images, and what it would keep.

Pure numpy on per-image arrays; provenance is only ever read here, to measure, never to select.
"""
from __future__ import annotations

import numpy as np


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting ½ (Mann–Whitney U).

    NaN when either side is empty.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    ranks = (last - (counts - 1) / 2.0)[inverse]  # mean rank of each tie group, 1-based
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def budget(n: int, fraction: float) -> int:
    """How many images "``fraction`` kept" means: floor(fraction · n)."""
    return int(np.floor(fraction * n))


def top_fraction(score: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the ``budget`` highest-scoring images (ties to the lower index)."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    mask = np.zeros(len(score), dtype=bool)
    mask[order[:budget(len(score), fraction)]] = True
    return mask


def precision_recall(kept: np.ndarray, relevant: np.ndarray) -> tuple[float, float]:
    n_kept, n_relevant = int(kept.sum()), int(relevant.sum())
    precision = float(relevant[kept].mean()) if n_kept else float("nan")
    recall = float(kept[relevant].sum() / n_relevant) if n_relevant else float("nan")
    return precision, recall


def group_aurocs(score: np.ndarray, relevant: np.ndarray, source: np.ndarray,
                 style: np.ndarray) -> dict[str, float]:
    """AUROC overall, then all relevant vs each irrelevant source (``src:<name>``), then, when there are
    several relevant sources, each vs all irrelevant images (``rel:<name>``), then each relevant style
    vs all irrelevant images (``style:<name>``)."""
    result = {"overall": auroc(score, relevant)}
    for name in sorted(set(source[~relevant].tolist())):
        chosen = relevant | (source == name)
        result[f"src:{name}"] = auroc(score[chosen], relevant[chosen])
    relevant_sources = sorted(set(source[relevant].tolist()))
    for name in relevant_sources if len(relevant_sources) > 1 else []:
        chosen = ~relevant | (source == name)
        result[f"rel:{name}"] = auroc(score[chosen], relevant[chosen])
    for name in sorted(set(style[relevant].tolist())):
        chosen = ~relevant | (style == name)
        result[f"style:{name}"] = auroc(score[chosen], relevant[chosen])
    return result
