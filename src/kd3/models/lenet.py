"""LeNet-5 and its half-width student, the classic teacher/student pair of DAFL (Chen et al., 2019).

``features`` is the output of the second conv stage (after ReLU and max-pool): 16×5×5 for lenet5,
8×5×5 for lenet5_half, for both 28×28 and 32×32 inputs. ``pool`` flattens that map and runs the
fully-connected layers, so the pooled vector is the 84-d (42-d) penultimate activation that DAFL's
feature losses use.

The ``_bn`` variants put a BatchNorm2d after each conv (whose bias is then dropped, being redundant)
and none after the fully-connected layers: BatchNorm-statistics methods only look at BatchNorm2d, and
keeping the fc stack plain leaves the penultimate vector the same kind of activation as in the plain
variants.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd3.models.base import Net
from kd3.models.registry import register_model

_KERNEL = 5


class LeNet5(Net):
    def __init__(self, conv_channels: tuple[int, int], fc_widths: tuple[int, int], num_classes: int,
                 in_channels: int, image_size: int, batch_norm: bool) -> None:
        super().__init__()
        # 28×28 inputs (MNIST-like) get 2 pixels of padding so the maps are the classic 32×32 ones.
        padding = 2 if image_size < 32 else 0
        side = ((image_size + 2 * padding - _KERNEL + 1) // 2 - _KERNEL + 1) // 2
        if side < 1:
            raise ValueError(f"LeNet needs images of at least 16×16 pixels, got {image_size}")
        c1, c2 = conv_channels
        self.conv = nn.Sequential(
            *_conv_stage(in_channels, c1, padding, batch_norm),
            *_conv_stage(c1, c2, 0, batch_norm),
        )
        self.fc = nn.Sequential(
            nn.Linear(c2 * side * side, fc_widths[0]), nn.ReLU(inplace=True),
            nn.Linear(fc_widths[0], fc_widths[1]), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(fc_widths[1], num_classes)
        self.feature_channels = c2

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(feature_map, 1))


def _conv_stage(in_channels: int, out_channels: int, padding: int, batch_norm: bool) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, _KERNEL, padding=padding, bias=not batch_norm)
    norm = [nn.BatchNorm2d(out_channels)] if batch_norm else []
    return [conv, *norm, nn.ReLU(inplace=True), nn.MaxPool2d(2)]


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> LeNet5:
    return LeNet5((6, 16), (120, 84), num_classes, in_channels, image_size, batch_norm=False, **kwargs)


@register_model("lenet5_half")
def lenet5_half(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> LeNet5:
    return LeNet5((3, 8), (60, 42), num_classes, in_channels, image_size, batch_norm=False, **kwargs)


@register_model("lenet5_bn")
def lenet5_bn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> LeNet5:
    return LeNet5((6, 16), (120, 84), num_classes, in_channels, image_size, batch_norm=True, **kwargs)


@register_model("lenet5_half_bn")
def lenet5_half_bn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                   **kwargs: Any) -> LeNet5:
    return LeNet5((3, 8), (60, 42), num_classes, in_channels, image_size, batch_norm=True, **kwargs)
