"""The Method interface and its registry.

A method chooses or makes each epoch's training data (``begin_epoch``), turns a batch into named
losses (``training_step``) and says what is shipped (``deployable``). The trainer owns the
optimizer loop, checkpoints, AMP and logging, and never knows which method runs.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kd3.data.augment import CropFlip, Normalizer
from kd3.data.storage import PoolImages
from kd3.models.base import Net


@dataclass
class DistillContext:
    """Everything a method may use. Pool provenance is deliberately not part of it."""

    teacher: Net | None  # None only when the run trains a teacher from labels
    images: PoolImages  # the training pool, uint8 N×C×H×W on the CPU: a tensor, or DiskImages read by index
    normalize: Normalizer
    augment: CropFlip
    num_classes: int
    epochs: int
    batch_size: int
    device: torch.device
    seed: int
    cache_dir: Path
    labels: torch.Tensor | None = None  # only for reference methods that use the original labelled data
    teacher_accuracy: float | None = None  # the teacher's validation accuracy, from its checkpoint record
    progress: bool = False

    @property
    def pool_size(self) -> int:
        return self.images.shape[0]


@dataclass
class EpochPlan:
    """What to train on this epoch: pool indices (shuffled and batched by the trainer), or a
    number of steps for methods that synthesise their own batches (``training_step(batch=None)``)."""

    indices: torch.Tensor | None = None
    steps: int = 0

    @property
    def size(self) -> int:
        return len(self.indices) if self.indices is not None else self.steps


@dataclass
class Batch:
    indices: torch.Tensor  # pool indices, CPU int64
    images: torch.Tensor  # uint8 images of those indices, on the training device


class Method(nn.Module, metaclass=ABCMeta):
    """Base class: a student plus whatever trainable parts the method adds.

    The teacher lives in ``ctx`` and is never registered as a submodule, so it is never in the
    optimizer or in a checkpoint and cannot be changed by a training step.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = type(None)
    uses_original_data: ClassVar[bool] = False

    def __init__(self, student: Net, ctx: DistillContext, options: Any):
        super().__init__()
        self.student = student
        self.ctx = ctx
        self.options = options

    @property
    def teacher(self) -> Net:
        if self.ctx.teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher, and this run has none")
        return self.ctx.teacher

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def begin_epoch(self, epoch: int) -> EpochPlan:
        return EpochPlan(indices=torch.arange(self.ctx.pool_size))

    @abstractmethod
    def training_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        """Named, already-weighted loss terms for one batch; the trainer sums them."""

    def deployable(self) -> nn.Module:
        return self.student

    def epoch_metrics(self) -> dict[str, Any]:
        """Extra per-epoch values for the JSONL log (selection sizes, loss parts, ...)."""
        return {}

    def method_state(self) -> dict[str, Any]:
        """Non-parameter state needed for exact resume (e.g. a fixed selection)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        del state

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        if self.ctx.teacher is not None:
            self.ctx.teacher.eval()  # the teacher's BatchNorm statistics must never move
        return self


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]

