"""MobileNetV2 (Sandler et al., 2018) adapted to CIFAR-sized inputs.

The stem is stride 1 and the second stage keeps stride 1 too (as in the common CIFAR ports), so the
network downsamples 8× instead of 32×: ``features`` returns a 1280×4×4 map for both 28×28 and 32×32
inputs. ``width_mult`` scales every layer's channels (rounded to multiples of 8, as in the paper);
the last 1×1 conv keeps 1280 channels for multipliers below 1, as torchvision does.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd3.models.base import Net
from kd3.models.registry import register_model

# (expansion t, output channels c, repeats n, first stride s); the paper's second stride 2 is 1 here.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1)]
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280


def _divisible(channels: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor`` without dropping more than 10% (the paper's rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
             activation: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups,
                                         bias=False), nn.BatchNorm2d(out_channels)]
    return layers + [nn.ReLU6(inplace=True)] if activation else layers


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        expand = _conv_bn(in_channels, hidden, 1) if expansion != 1 else []
        self.block = nn.Sequential(*expand, *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                   *_conv_bn(hidden, out_channels, 1, activation=False))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(Net):
    def __init__(self, num_classes: int, in_channels: int, width_mult: float = 1.0) -> None:
        super().__init__()
        channels = _divisible(_STEM_CHANNELS * width_mult)
        layers: list[nn.Module] = _conv_bn(in_channels, channels, 3)
        for expansion, base_channels, repeats, stride in _SETTINGS:
            out_channels = _divisible(base_channels * width_mult)
            for index in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion))
                channels = out_channels
        last = _divisible(_LAST_CHANNELS * max(1.0, width_mult))
        layers += _conv_bn(channels, last, 1)
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)
        self.feature_channels = last
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# image_size is accepted for the common factory signature; global average pooling makes it irrelevant.
@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width_mult: float = 1.0,
                **kwargs: Any) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, width_mult=width_mult, **kwargs)
