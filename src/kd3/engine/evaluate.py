"""Accuracy of a classifier on a labelled split, in inference mode and batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd3.data.augment import Normalizer
from kd3.engine.distributed import map_rows


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    count: int

    @property
    def standard_error(self) -> float:
        """Binomial standard error of the accuracy: the test-set noise a reader should know."""
        return (self.accuracy * (1 - self.accuracy) / max(self.count, 1)) ** 0.5


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, normalize: Normalizer, device: torch.device,
                   batch_size: int = 1024) -> torch.Tensor:
    was_training = model.training
    model.eval()
    if len(images) == 0:
        model.train(was_training)
        return torch.empty(0)
    # Sharded over ranks under torchrun, so every rank gets the whole result at a rank's cost.
    (logits,) = map_rows(len(images), batch_size,
                         lambda start, stop: [model(normalize(images[start:stop].to(device))).float().cpu()])
    model.train(was_training)
    return logits


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Normalizer,
             device: torch.device, batch_size: int = 1024) -> EvalResult:
    logits = predict_logits(model, images, normalize, device, batch_size)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    return EvalResult(accuracy=accuracy, loss=loss, count=len(labels))
