"""How well an epoch's training set matches the truly relevant pool images (benchmarks only).

Methods never see provenance; the trainer measures their choice against it when it exists.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def selection_metrics(indices: torch.Tensor, relevant: np.ndarray, source: np.ndarray,
                      teacher_correct: np.ndarray | None = None) -> dict[str, Any]:
    """Precision and recall of ``indices`` against ``relevant`` (and against relevant & teacher-correct),
    plus the share of each pool source among the chosen images."""
    chosen = np.zeros(len(relevant), dtype=bool)
    chosen[indices.cpu().numpy()] = True
    n_chosen = int(chosen.sum())
    result: dict[str, Any] = {
        "selected": n_chosen,
        "precision": float(relevant[chosen].mean()) if n_chosen else float("nan"),
        "recall": float(chosen[relevant].mean()) if relevant.any() else float("nan"),
    }
    if teacher_correct is not None:
        useful = relevant & teacher_correct
        result["precision_correct"] = float(useful[chosen].mean()) if n_chosen else float("nan")
        result["recall_correct"] = float(chosen[useful].mean()) if useful.any() else float("nan")
    names, counts = np.unique(source[chosen], return_counts=True)
    result["source_share"] = {str(n): float(c) / n_chosen for n, c in zip(names, counts)}
    return result
