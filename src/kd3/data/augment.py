"""Batched augmentation on uint8 tensors, and fixed views whose teacher outputs can be cached.

Images stay uint8 until the last moment; a whole batch is cropped and flipped with one gather
instead of per-sample PIL calls, which is what keeps CPU training fast (docs/design.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CropFlip:
    """Random crop after zero padding plus optional horizontal flip (the usual small-image recipe)."""

    padding: int = 2
    flip: bool = True

    def sample_params(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image parameters (dy, dx, flip) as an n×3 int64 tensor."""
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n, 1), generator=generator) if self.flip else torch.zeros(n, 1, dtype=torch.long)
        return torch.cat([offsets, flips], dim=1)

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Crop and flip a batch N×C×H×W (any dtype) with the given n×3 parameters."""
        n, _, h, w = images.shape
        params = params.to(images.device)
        padded = torch.nn.functional.pad(images, (self.padding,) * 4)
        rows = params[:, 0:1] + torch.arange(h, device=images.device)
        cols = params[:, 1:2] + torch.arange(w, device=images.device)
        flipped = params[:, 2:3].bool()
        cols = torch.where(flipped, cols.flip(1), cols)
        batch = torch.arange(n, device=images.device)[:, None, None]
        # Advanced indexing over (batch, row, col) moves channels last; put them back.
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.padding == 0 and not self.flip:
            return images  # the identity: no gather, and no random numbers drawn for nothing
        return self.apply(images, self.sample_params(images.shape[0], generator))


class Normalizer:
    """uint8 N×C×H×W -> float, standardised with the teacher's training statistics."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() / 255.0 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to uint8 (used to show synthesised images)."""
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


class FixedViews:
    """K fixed augmented views per image, reproducible from a seed.

    The teacher is frozen, so its outputs on these views can be computed once and cached; a
    training step then picks one view per image, rebuilds that exact crop for the student and
    reads the teacher's output from the cache (about 10x cheaper than a teacher forward per step).
    """

    def __init__(self, num_images: int, num_views: int, augment: CropFlip, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.num_views = num_views
        self.augment = augment
        self.params = augment.sample_params(num_images * num_views, generator).view(num_images, num_views, 3)

    def apply(self, images: torch.Tensor, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """The given views of pool images ``indices`` (images is the uint8 batch of those indices)."""
        return self.augment.apply(images, self.params[indices.cpu(), views.cpu()])
