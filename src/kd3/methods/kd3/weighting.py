"""Per-instance weights w_i of the feature-alignment loss (docs/method.md §2), pluggable by name.

A weight function maps (student logits, teacher logits), both B×K, to B detached weights.
"""
from __future__ import annotations

from typing import Callable

import torch

WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sigmoid_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """w = sigmoid(‖z_S − z_T‖₂) on raw logits, in (0.5, 1): images where the networks disagree more
    weigh more. Detached: the weight steers the loss, it is not itself optimised."""
    distance = (student_logits.detach().float() - teacher_logits.detach().float()).norm(dim=1)
    return torch.sigmoid(distance)


def uniform(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """w = 1: the weighting ablation."""
    del teacher_logits
    return torch.ones(student_logits.shape[0], device=student_logits.device)


WEIGHTINGS: dict[str, WeightFn] = {"sigmoid": sigmoid_distance, "uniform": uniform}


def get_weighting(name: str) -> WeightFn:
    if name not in WEIGHTINGS:
        raise ValueError(f"kd3 weighting={name!r}; valid: {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[name]
