"""``cnn_bn``: a small VGG-style BatchNorm CNN (~140k parameters) that trains to a strong
Fashion-MNIST teacher in a few CPU minutes.

conv32-conv32-pool-conv64-conv64-pool-conv128, each 3×3 conv followed by BatchNorm and ReLU, then
global average pooling. ``features`` is the 128-channel map after the last conv: 128×7×7 for 28×28
inputs and 128×8×8 for 32×32.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd3.models.base import Net
from kd3.models.registry import register_model

# Conv widths per stage; a 2×2 max-pool separates consecutive stages.
_STAGES = [[32, 32], [64, 64], [128]]


class CnnBN(Net):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index, stage in enumerate(_STAGES):
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
