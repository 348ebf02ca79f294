"""The SimKD-style projector φ that maps the student's last feature map into the teacher's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def common_size(student_size: tuple[int, int], teacher_size: tuple[int, int]) -> tuple[int, int]:
    """The spatial size both maps are compared at: the smaller one (the larger is average-pooled)."""
    return min(student_size[0], teacher_size[0]), min(student_size[1], teacher_size[1])


def pool_to(feature_map: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Average-pool a N×C×H×W map down to ``size``; a map already that size is returned as is."""
    if feature_map.shape[2] == size[0] and feature_map.shape[3] == size[1]:
        return feature_map
    return F.adaptive_avg_pool2d(feature_map, size)


class Projector(nn.Module):
    """1×1 C_S→C_T/2, BN, ReLU; 3×3 C_T/2→C_T/2, BN, ReLU; 1×1 C_T/2→C_T, BN, ReLU (convs without
    bias: BN follows each). A student map larger than ``size`` is average-pooled to it first."""

    def __init__(self, student_channels: int, teacher_channels: int, student_size: tuple[int, int],
                 size: tuple[int, int]):
        super().__init__()
        hidden = max(teacher_channels // 2, 1)
        self.size = list(size)  # a list, not a tuple, so TorchScript types it as List[int]
        # Decided once from the known map sizes: a shape test in forward would be frozen by tracing anyway.
        self.pool_input = tuple(student_size) != tuple(size)
        self.layers = nn.Sequential(
            nn.Conv2d(student_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, student_map: torch.Tensor) -> torch.Tensor:
        if self.pool_input:
            student_map = F.adaptive_avg_pool2d(student_map, self.size)
        return self.layers(student_map)


class PooledProjector(nn.Module):
    """φ for ``sharing: pooled``: the student's pooled vector (``student.pool(F_S)``, d_S wide) into
    the teacher's (d_T, what ``teacher.classifier`` reads). Linear d_S→d_T/2, BN, ReLU; Linear
    d_T/2→d_T, BN, ReLU (no bias: BN follows each): the map projector with its 3×3 conv, which has
    no spatial extent to act on here, left out. The closing BN + ReLU put φ's output on the scale
    and in the non-negative range of the vector it is aligned with and shares the classifier of
    (GAP of a ReLU map, or LeNet's ReLU'd fc output)."""

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        hidden = max(teacher_width // 2, 1)
        self.layers = nn.Sequential(
            nn.Linear(student_width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, teacher_width, bias=False), nn.BatchNorm1d(teacher_width), nn.ReLU(inplace=True),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)
