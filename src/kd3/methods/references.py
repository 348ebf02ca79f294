"""Reference rows that use the original labelled data D_o (the data a real user no longer has).

They bound what the pool methods can reach; they are references, not methods for the setting.
For both, the trainer loads D_o into ``ctx.images`` and its labels into ``ctx.labels``.

- ``supervised``: the student trained with cross-entropy on D_o's labels, with the usual random
  crop + flip augmentation (``ctx.augment``). Needs no teacher.
- ``kd-original``: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), on D_o:
  blind KD's code path (``BlindKD``, cached teacher logits on fixed views) with the original
  images instead of the pool, i.e. the limit of distillation for this teacher and student.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd3.methods.base import Batch, DistillContext, Method, register_method
from kd3.methods.blind_kd import BlindKD
from kd3.models.base import Net


@dataclass
class SupervisedOptions:
    label_smoothing: float = 0.0


@register_method
class Supervised(Method):
    name = "supervised"
    Options = SupervisedOptions
    uses_original_data = True

    def __init__(self, student: Net, ctx: DistillContext, options: SupervisedOptions):
        super().__init__(student, ctx, options)
        if ctx.labels is None:
            raise ValueError("method 'supervised' needs the original labelled data: ctx.labels is None")
        if len(ctx.labels) != ctx.pool_size:
            raise ValueError(f"method 'supervised': {len(ctx.labels)} labels for {ctx.pool_size} images")
        self.labels = ctx.labels.long().cpu()

    def training_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None
        x = self.ctx.normalize(self.ctx.augment(batch.images))
        labels = self.labels[batch.indices.cpu()].to(x.device)
        logits = self.student(x)
        return {"ce": F.cross_entropy(logits.float(), labels, label_smoothing=self.options.label_smoothing)}


@register_method
class KDOriginal(BlindKD):
    """Blind KD, on the original data (same options: temperature, teacher_views)."""

    name = "kd-original"
    uses_original_data = True
