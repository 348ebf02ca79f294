"""Batch mixing (mixup, CutMix) for distillation: the teacher labels each mixed image itself.

Beyer et al., "Knowledge distillation: A good teacher is patient and consistent" (CVPR 2022):
when the teacher sees exactly the student's input ("function matching"), aggressive mixing of
the training images is what lets distillation on few or off-domain images go on improving. The
target is the teacher's output on the mixed image, so no label arithmetic is needed and any
pool, labelled or not, can be mixed. Their schedules are long (thousands of epochs); on kd3's
20-epoch fashion-wild benchmark mixup costs accuracy (rows ``*-mixup`` of results/fashion-wild.md),
so no shipped recipe mixes.

Each image is mixed with another image of the same batch (a random permutation), with its own
mixing weight λ ~ Beta(α, α): mixup blends the two images, CutMix pastes a box of the partner
covering a share 1 − λ of the image. Mixing commutes with per-channel normalisation, so it may
be applied to normalised tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MIX_KINDS = ("none", "mixup", "cutmix")


@dataclass(frozen=True)
class Mixing:
    kind: str = "none"  # none | mixup | cutmix
    alpha: float = 1.0  # Beta(α, α) for the mixing weight; 1 = uniform

    def __post_init__(self) -> None:
        if self.kind not in MIX_KINDS:
            raise ValueError(f"mix={self.kind!r}: use one of {', '.join(MIX_KINDS)}")
        if not self.alpha > 0:
            raise ValueError(f"mix_alpha must be positive, got {self.alpha}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def weights(self, n: int) -> torch.Tensor:
        """λ_i ~ Beta(α, α) for each of n images (from torch's global generator, seeded by the trainer)."""
        return torch.distributions.Beta(self.alpha, self.alpha).sample((n,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Mix a float batch N×C×H×W; returns a new tensor (the input is untouched)."""
        if not self.active or x.shape[0] < 2:
            return x
        n, _, h, w = x.shape
        partner = x[torch.randperm(n)]
        lam = self.weights(n).to(x.device, x.dtype)
        if self.kind == "mixup":
            lam = lam.view(n, 1, 1, 1)
            return lam * x + (1 - lam) * partner
        return torch.where(cutmix_boxes(lam, h, w)[:, None], partner, x)


def cutmix_boxes(lam: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """N×H×W boolean masks of boxes with sides √(1 − λ)·(H, W), centred uniformly at random and
    clipped at the border (as in Yun et al., 2019, so a clipped box covers less than 1 − λ)."""
    n = lam.shape[0]
    side = (1 - lam).clamp(0, 1).sqrt()
    box_h, box_w = (side * h).round(), (side * w).round()
    cy, cx = torch.rand(n, device=lam.device) * h, torch.rand(n, device=lam.device) * w
    top, bottom = (cy - box_h / 2).clamp(0, h).round(), (cy + box_h / 2).clamp(0, h).round()
    left, right = (cx - box_w / 2).clamp(0, w).round(), (cx + box_w / 2).clamp(0, w).round()
    rows = torch.arange(h, device=lam.device).view(1, h, 1)
    cols = torch.arange(w, device=lam.device).view(1, 1, w)
    inside_rows = (rows >= top.view(n, 1, 1)) & (rows < bottom.view(n, 1, 1))
    inside_cols = (cols >= left.view(n, 1, 1)) & (cols < right.view(n, 1, 1))
    return inside_rows & inside_cols
