"""The teacher's weight a(e) in the blended selection score (docs/method.md §1).

Early on the student knows nothing, so selection trusts the teacher (a ≈ 1); the weight decays
along a Gaussian-shaped curve towards the horizon and is cut to 0 half-way through training, after
which the student's own (shared-classifier) logits alone decide what it trains on. The released
constants are for E = 240 epochs (cut-off 120, horizon 160); they are kept as fractions of E so a
10-epoch run follows the same curve.

The learning-rate milestones of §4 (0.625E, 0.75E, 0.875E) are not here: the trainer's step
schedule already takes milestones as fractions of the run (``train.milestones``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherWeight:
    """a(e) = 1 − exp(−sharpness · ((e+1)/horizon − 1)²) for e < cutoff, else 0 (e is 0-based)."""

    cutoff: float  # first epoch (possibly fractional) at which a(e) is 0
    horizon: float  # epoch at which the curve itself would reach 0
    sharpness: float = 5.0

    @classmethod
    def for_run(cls, epochs: int, cutoff_fraction: float = 0.5, horizon_fraction: float = 2 / 3,
                sharpness: float = 5.0) -> TeacherWeight:
        if epochs < 1:
            raise ValueError(f"epochs={epochs}; a run needs at least one epoch")
        if cutoff_fraction < 0 or horizon_fraction <= 0:
            raise ValueError(f"teacher-weight fractions must be positive, got cutoff={cutoff_fraction}, "
                             f"horizon={horizon_fraction}")
        return cls(cutoff=cutoff_fraction * epochs, horizon=horizon_fraction * epochs, sharpness=sharpness)

    def __call__(self, epoch: int) -> float:
        if epoch >= self.cutoff:
            return 0.0
        return 1.0 - math.exp(-self.sharpness * ((epoch + 1) / self.horizon - 1.0) ** 2)
