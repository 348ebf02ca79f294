"""Wide ResNets (Zagoruyko & Komodakis, 2016), the WRN-depth-k teachers/students of CIFAR distillation.

Pre-activation blocks in three groups of 16k/32k/64k channels at strides 1/2/2, (depth-4)/6 blocks
each, closed by BatchNorm + ReLU. ``features`` returns that final activated map: 64k×7×7 for 28×28
inputs and 64k×8×8 for 32×32.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd3.models.base import Net, kaiming_init_convs
from kd3.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        # As in the original, a projection shortcut reads the pre-activated input, an identity the raw one.
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + residual


class WideResNet(Net):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)]
        channels = 16
        for index, width in enumerate(widths):
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(WideBlock(channels, width, stride, dropout))
                channels = width
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        self.feature_channels = channels
        kaiming_init_convs(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# image_size is accepted for the common factory signature; global average pooling makes it irrelevant.
@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_channels, **kwargs)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_channels, **kwargs)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_channels, **kwargs)
