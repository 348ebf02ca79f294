"""Dynamic instance selection (METHOD.md §1): blend teacher and student logits, then keep the
images whose blended confidence clears a FlexMatch-style class-adaptive threshold (``select``), or,
with a relevance score or ``thresholds: percentile``, the top of each predicted class under a
global budget (``percentile_select``).

Pure tensor functions; the method feeds them the logits of a whole-pool scoring pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch



@dataclass
class Selection:
    indices: torch.Tensor  # selected pool indices, ascending, int64
    predicted_per_class: torch.Tensor  # σ_k: pool images whose blended argmax is k (selected or not)
    selected_per_class: torch.Tensor  # selected images per predicted class
    thresholds: torch.Tensor  # τ_k (percentile rule: the lowest kept score of class k, NaN if none)

    @property
    def empty(self) -> bool:
        return self.indices.numel() == 0


def blended_prediction(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                       teacher_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, ŷ) of q = softmax(a·z_T + (1−a)·z_S): logits are mixed before the softmax, no temperature."""
    mixed = teacher_weight * teacher_logits.float() + (1.0 - teacher_weight) * student_logits.float()
    return torch.softmax(mixed, dim=1).max(dim=1)


def class_thresholds(predicted_per_class: torch.Tensor, base_threshold: float) -> torch.Tensor:
    """τ_k = τ·β_k/(2−β_k) with β_k = σ_k / max σ: the most predicted class keeps τ, rarer ones get
    less, which rebalances the selected set. Classes nobody predicts get 0 (it is never used)."""
    counts = predicted_per_class.double()
    beta = counts / counts.max().clamp(min=1)
    return (base_threshold * beta / (2 - beta)).float()


def select(confidence: torch.Tensor, prediction: torch.Tensor, num_classes: int,
           base_threshold: float) -> Selection:
    """Keep image j when c_j > τ_{ŷ_j} (strictly)."""
    predicted = torch.bincount(prediction, minlength=num_classes)
    thresholds = class_thresholds(predicted, base_threshold)
    keep = confidence > thresholds[prediction]
    return Selection(indices=keep.nonzero().flatten(), predicted_per_class=predicted,
                     selected_per_class=torch.bincount(prediction[keep], minlength=num_classes),
                     thresholds=thresholds)


def keep_budget(pool_size: int, keep_fraction: float) -> int:
    """At most floor(keep_fraction · N) images are kept by the percentile thresholds."""
    return math.floor(keep_fraction * pool_size)


def balanced_quotas(counts: list[int], budget: int) -> list[int]:
    """Spread ``budget`` over classes as evenly as their sizes allow (water-filling).

    quota_k = min(n_k, q) with q the largest level such that Σ_k min(n_k, q) ≤ budget; the few
    units still left (fewer than the classes above q) go one each to the classes above q, lowest
    index first. Σ quota_k = min(budget, Σ n_k), never more, and no quota exceeds its class.
    """
    budget = min(budget, sum(counts))
    low, high = 0, max(counts, default=0)
    while low < high:  # the largest q with Σ min(n_k, q) ≤ budget
        middle = (low + high + 1) // 2
        if sum(min(c, middle) for c in counts) <= budget:
            low = middle
        else:
            high = middle - 1
    quotas = [min(c, low) for c in counts]
    left = budget - sum(quotas)
    for k, c in enumerate(counts):
        if left and c > quotas[k]:
            quotas[k] += 1
            left -= 1
    return quotas


def percentile_select(score: torch.Tensor, prediction: torch.Tensor, num_classes: int,
                      keep_fraction: float) -> Selection:
    """Class-adaptive thresholds restated on within-class percentiles, under a global budget.

    B = floor(keep_fraction · N) images are kept in all (never more). B is spread as evenly as
    possible over the predicted classes (``balanced_quotas``: every class may keep up to B/K, a
    class with fewer images keeps them all and its unused share goes to the others), and class k
    keeps its quota_k highest-scoring images (ties to the lower pool index). Its threshold τ_k is
    thus its own (1 − quota_k/n_k)·100 percentile, reported as the lowest kept score (NaN when the
    class keeps none).

    Why: τ_k depends only on the scores of class k's own images, so a class that absorbs the pool's
    junk cannot pull any other class's threshold down (the FlexMatch mapping τ·β_k/(2 − β_k) does:
    a huge σ_junk makes every other β_k small), and it cannot take more than its even share of the
    budget. Rare classes still get lower thresholds, which is what FlexMatch's rebalancing is for;
    like it, this assumes the relevant images are roughly balanced over the teacher's classes.
    Comparing scores only within a class also removes class-dependent score scales (feature norms,
    energies).
    """
    predicted = torch.bincount(prediction, minlength=num_classes)
    quota = torch.tensor(balanced_quotas(predicted.tolist(), keep_budget(len(score), keep_fraction)),
                         dtype=torch.long)
    # Order by class, then by descending score within the class (both sorts stable).
    order = torch.sort(score.double(), descending=True, stable=True).indices
    order = order[torch.sort(prediction[order], stable=True).indices]
    starts = torch.cumsum(predicted, 0) - predicted
    position = torch.arange(len(order)) - starts[prediction[order]]
    keep = torch.zeros(len(score), dtype=torch.bool)
    keep[order[position < quota[prediction[order]]]] = True
    thresholds = torch.full((num_classes,), math.inf).scatter_reduce(
        0, prediction[keep], score[keep].float(), reduce="amin")
    thresholds[thresholds == math.inf] = math.nan
    return Selection(indices=keep.nonzero().flatten(), predicted_per_class=predicted,
                     selected_per_class=torch.bincount(prediction[keep], minlength=num_classes),
                     thresholds=thresholds)
