"""The Net interface every model in kd3 exposes, ours or adapted.

Methods reach a network's last feature map, its pooled vector and its final linear layer
through these four members only, so a user's own teacher works once it is wrapped.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn


class Net(nn.Module, metaclass=ABCMeta):
    """A classifier split into backbone feature map -> pooled vector -> linear classifier.

    Subclasses set ``self.classifier`` (an ``nn.Linear``) and implement ``features``.
    ``feature_channels`` is the channel count C of the map ``features`` returns (N×C×H×W).
    """

    if TYPE_CHECKING:  # class-level annotations would make every Net unscriptable by torch.jit.script
        classifier: nn.Linear
        feature_channels: int

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map, N×C×H×W."""

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(feature_map, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features


def kaiming_init_convs(module: nn.Module) -> None:
    """He initialisation (fan-out, ReLU gain) of every conv, the usual start for ResNet-style nets."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
