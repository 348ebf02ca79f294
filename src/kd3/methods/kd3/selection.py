"""Dynamic instance selection (METHOD.md §1): blend teacher and student logits, then keep the
images whose blended confidence clears a FlexMatch-style class-adaptive threshold.

Pure tensor functions; the method feeds them the logits of a whole-pool scoring pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    indices: torch.Tensor  # selected pool indices, ascending, int64
    predicted_per_class: torch.Tensor  # σ_k: pool images whose blended argmax is k (selected or not)
    selected_per_class: torch.Tensor  # selected images per predicted class
    thresholds: torch.Tensor  # τ_k

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
