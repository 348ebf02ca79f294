"""Tiny networks and data for fast engine tests (no dataset, no zoo)."""
from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from baseline_nets import make_context
from kd3.data.augment import Normalizer
from kd3.methods.base import DistillContext
from kd3.models.base import Net


class TinyNet(Net):
    """Conv-BN-ReLU-pool on 8×8 images; pools by flattening so the square's position is kept."""

    def __init__(self, channels: int = 4, num_classes: int = 3, in_channels: int = 1, size: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.feature_channels = channels
        self.classifier = nn.Linear(channels * (size // 2) ** 2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map.flatten(1)


def blobs(n: int, num_classes: int = 3, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is where a bright square sits (left, middle, right): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randint(0, 40, (n, 1, size, size), generator=g).to(torch.uint8)
    width = size // num_classes
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 2:size - 2, label * width:(label + 1) * width] = 230
    return images, labels


def context(teacher: Net | None, images: torch.Tensor, labels: torch.Tensor | None = None, epochs: int = 2,
            batch_size: int = 16, cache_dir: Path = Path("/tmp")) -> DistillContext:
    """The engine tests' context: ``make_context`` with their normalisation and no flips."""
    return make_context(teacher, images, labels, batch_size=batch_size, normalize=Normalizer((0.2,), (0.3,)),
                        flip=False, epochs=epochs, cache_dir=cache_dir)


def traced_peak(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s result and the peak of Python-allocated memory (tracemalloc, bytes) while it ran."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
