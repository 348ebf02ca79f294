"""Tiny networks, contexts and a minimal training loop for the baseline-method tests."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kd3.data.augment import CropFlip, Normalizer
from kd3.methods.base import Batch, DistillContext, Method
from kd3.models.base import Net

SIZE = 8



class BNNet(Net):
    """conv-BN-ReLU, strided conv-BN-ReLU, global average pool, linear: two BatchNorm2d layers."""

    def __init__(self, num_classes: int = 3, in_channels: int = 1, width: int = 6):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.feature_channels = 2 * width
        self.classifier = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PlainNet(Net):
    """The same shape without any BatchNorm (DeepInversion must refuse it as a teacher)."""

    def __init__(self, num_classes: int = 3, in_channels: int = 1, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.feature_channels = width
        self.classifier = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class IntensityTeacher(Net):
    """Logits = [scale·m, 0, ..., 0] with m the image's mean (normalised) intensity.

    With non-negative inputs its confidence grows strictly with the image's brightness, so the
    most confident images of a pool are exactly its brightest ones.
    """

    def __init__(self, num_classes: int = 3, scale: float = 5.0):
        super().__init__()
        self.feature_channels = 1
        self.classifier = nn.Linear(1, num_classes)
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()
            self.classifier.weight[0, 0] = scale

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


def random_images(n: int, seed: int = 0, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, SIZE, SIZE), generator=g, dtype=torch.uint8)


def make_context(teacher: Net | None, images: torch.Tensor, labels: torch.Tensor | None = None,
                 num_classes: int = 3, batch_size: int = 16, normalize: Normalizer | None = None,
                 flip: bool = True, epochs: int = 2, cache_dir: Path = Path("/tmp")) -> DistillContext:
    if teacher is not None:
        teacher.eval()
    return DistillContext(teacher=teacher, images=images, labels=labels,
                          normalize=normalize or Normalizer((0.3,), (0.3,)), augment=CropFlip(padding=1, flip=flip),
                          num_classes=num_classes, epochs=epochs, batch_size=batch_size, device=torch.device("cpu"),
                          seed=0, cache_dir=cache_dir)


def train_epochs(method: Method, epochs: int = 1, lr: float = 0.05, max_steps: int | None = None) -> list[dict]:
    """What the trainer does, minus logging: SGD on trainable_parameters over the epoch plans."""
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=lr, momentum=0.9)
    history = []
    ctx = method.ctx
    for epoch in range(epochs):
        plan = method.begin_epoch(epoch)
        method.train()
        if plan.indices is not None:
            order = plan.indices[torch.randperm(len(plan.indices))]
            batches = [order[i:i + ctx.batch_size] for i in range(0, len(order), ctx.batch_size)]
            batches = [b for b in batches if len(b) > 1]
        else:
            batches = [None] * plan.steps
        if max_steps is not None:
            batches = batches[:max_steps]
        for chunk in batches:
            batch = None if chunk is None else Batch(indices=chunk, images=ctx.images[chunk])
            losses = method.training_step(batch)
            loss = sum(losses.values())
            assert torch.isfinite(loss), losses
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history.append(method.epoch_metrics())
    return history


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
