"""CIFAR-style ResNets: a 3×3 stride-1 stem and no max-pool, so 28–32 pixel inputs keep their detail.

resnet8/20/32 are the 6n+2 networks of He et al. (2016, section 4.2): three stages of 16/32/64
channels at strides 1/2/2, giving a 64×7×7 map for 28×28 inputs and 64×8×8 for 32×32. resnet18/34
are the ImageNet block layouts with this stem: 64..512 channels at strides 1/2/2/2, giving 512×4×4
for both input sizes. Shortcuts that change shape are 1×1 conv + BatchNorm projections (the usual
choice in distillation code bases, e.g. RepDistiller), not He et al.'s zero-padding option A.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd3.models.base import Net, kaiming_init_convs
from kd3.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(Net):
    def __init__(self, blocks_per_stage: list[int], widths: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, channels = [], widths[0]
        for index, (blocks, width) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if index == 0 else 2
            for block in range(blocks):
                stages.append(BasicBlock(channels, width, stride if block == 0 else 1))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(channels, num_classes)
        self.feature_channels = channels
        kaiming_init_convs(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def _small(n: int, num_classes: int, in_channels: int, **kwargs: Any) -> CifarResNet:
    return CifarResNet([n, n, n], [16, 32, 64], num_classes, in_channels, **kwargs)


def _large(blocks: list[int], num_classes: int, in_channels: int, **kwargs: Any) -> CifarResNet:
    return CifarResNet(blocks, [64, 128, 256, 512], num_classes, in_channels, **kwargs)


# image_size is accepted for the common factory signature; global average pooling makes it irrelevant.
@register_model("resnet8")
def resnet8(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> CifarResNet:
    return _small(1, num_classes, in_channels, **kwargs)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> CifarResNet:
    return _small(3, num_classes, in_channels, **kwargs)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> CifarResNet:
    return _small(5, num_classes, in_channels, **kwargs)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> CifarResNet:
    return _large([2, 2, 2, 2], num_classes, in_channels, **kwargs)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> CifarResNet:
    return _large([3, 4, 6, 3], num_classes, in_channels, **kwargs)
