"""Blind KD: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), on every pool image.

The baseline that ignores the distribution shift: no selection, no alignment, just the teacher's
softened predictions on the whole web pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kd3.data.mixing import Mixing
from kd3.methods.base import Batch, DistillContext, Method, register_method
from kd3.methods.losses import kd_loss
from kd3.methods.teacher_outputs import TeacherLogits
from kd3.models.base import Net


@dataclass
class BlindKDOptions:
    temperature: float = 4.0
    teacher_views: int = 8  # fixed augmented views with cached teacher logits; 0 runs the teacher every step
    mix: str = "none"  # none | mixup | cutmix (kd3.data.mixing; needs teacher_views: 0)
    mix_alpha: float = 1.0  # Beta(α, α) of the mixing weight


@register_method
class BlindKD(Method):
    name = "blind_kd"
    Options = BlindKDOptions

    def __init__(self, student: Net, ctx: DistillContext, options: BlindKDOptions):
        super().__init__(student, ctx, options)
        self.teacher_logits = TeacherLogits(ctx, options.teacher_views, Mixing(options.mix, options.mix_alpha))

    def training_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None
        x, teacher_logits = self.teacher_logits(batch)
        return {"kd": kd_loss(self.student(x), teacher_logits, self.options.temperature)}
