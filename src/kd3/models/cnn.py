"""VGG-style BatchNorm CNNs ending in global average pooling + one linear classifier, the network
regime of the KD³ paper (its classifier sharing shares that one linear layer).

Each stage is a list of 3×3 convs, each followed by BatchNorm and ReLU; a 2×2 max-pool separates
consecutive stages; then global average pooling (``Net.pool``) and the linear classifier.
``features`` is the map after the last conv.

- ``cnn_bn``: stages [[32, 32], [64, 64], [128]] (~140k parameters, ~22M multiply-adds per 28×28
  image): a strong Fashion-MNIST teacher in a few CPU minutes; features 128×7×7 for 28×28 inputs
  and 128×8×8 for 32×32.
- ``cnn_small_bn`` / ``cnn_small_half_bn``: stages [[16], [32], [64]] and half that width,
  [[8], [16], [32]] (~24k / ~6k parameters, ~1.9M / ~0.5M multiply-adds per 28×28 image): a GAP
  teacher/student pair cheap enough for multi-seed CPU benches; features 64×7×7 / 32×7×7.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from kd3.models.base import Net
from kd3.models.registry import register_model

# Conv widths per stage; a 2×2 max-pool separates consecutive stages.
_STAGES = [[32, 32], [64, 64], [128]]
_SMALL_STAGES = [[16], [32], [64]]
_SMALL_HALF_STAGES = [[8], [16], [32]]


class CnnBN(Net):
    def __init__(self, num_classes: int, in_channels: int,
                 stages: Sequence[Sequence[int]] = tuple(map(tuple, _STAGES))) -> None:
        super().__init__()
        if not stages or not all(stages):
            raise ValueError(f"CnnBN needs at least one stage and one conv per stage, got {stages}")
        layers: list[nn.Module] = []
        channels = in_channels
        for index, stage in enumerate(stages):
            if index:
                layers.append(nn.MaxPool2d(2))
            for width in stage:
                # No conv bias: the following BatchNorm's shift makes it redundant.
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        self.feature_channels = channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# image_size is accepted for the common factory signature; global average pooling makes it irrelevant.
@register_model("cnn_bn")
def cnn_bn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> CnnBN:
    return CnnBN(num_classes, in_channels, **kwargs)


@register_model("cnn_small_bn")
def cnn_small_bn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> CnnBN:
    return CnnBN(num_classes, in_channels, stages=_SMALL_STAGES, **kwargs)


@register_model("cnn_small_half_bn")
def cnn_small_half_bn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                      **kwargs: Any) -> CnnBN:
    return CnnBN(num_classes, in_channels, stages=_SMALL_HALF_STAGES, **kwargs)
