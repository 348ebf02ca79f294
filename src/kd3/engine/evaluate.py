"""Accuracy of a classifier on a labelled split, in inference mode and batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd3.data.augment import Normalizer


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
    outputs = [model(normalize(images[i:i + batch_size].to(device))).float().cpu()
               for i in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Normalizer,
             device: torch.device, batch_size: int = 1024) -> EvalResult:
    logits = predict_logits(model, images, normalize, device, batch_size)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    return EvalResult(accuracy=accuracy, loss=loss, count=len(labels))
