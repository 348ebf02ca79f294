"""MixDistribution (docs/method.md §3): give each image another image's per-channel statistics, partly,
keeping its standardised content, so the student learns features that ignore the style shift.

Randomness comes from the global CPU torch generator (the trainer saves and restores it), drawn
on the CPU whatever the device so a run is reproducible across devices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-6  # added to the variance, as in the released code


@dataclass
class MixParams:
    permutation: torch.Tensor  # π: image i borrows statistics from image π(i)
    lam: torch.Tensor  # λ_i ~ Beta(α, α), one per image


def sample_mix(batch_size: int, alpha: float, probability: float = 1.0) -> MixParams | None:
    """Draw π and λ for one batch; None (leave the batch as it is) with probability 1 − p.

    With p = 1 (the default) no coin is drawn at all, so the random stream matches the released
    behaviour of mixing every batch.
    """
    if probability < 1.0 and torch.rand(()).item() >= probability:
        return None
    permutation = torch.randperm(batch_size)
    lam = torch.distributions.Beta(alpha, alpha).sample((batch_size,))
    return MixParams(permutation=permutation, lam=lam)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: μ = spatial mean, σ = sqrt(unbiased spatial variance + 1e-6), detached."""
    if x.dim() != 4 or x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"MixDistribution needs N×C×H×W maps with at least 2 positions, got {tuple(x.shape)}")
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = (x.var(dim=(2, 3), keepdim=True, unbiased=True) + EPS).sqrt()
    return mean.detach(), std.detach()


def mix_distribution(x: torch.Tensor, params: MixParams | None) -> torch.Tensor:
    """x̃_i = σ̃_i·(x_i − μ_i)/σ_i + μ̃_i with μ̃ = λμ_i + (1−λ)μ_π(i), σ̃ likewise."""
    if params is None:
        return x
    mean, std = channel_stats(x)
    lam = params.lam.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    permutation = params.permutation.to(x.device)
    mixed_mean = lam * mean + (1 - lam) * mean[permutation]
    mixed_std = lam * std + (1 - lam) * std[permutation]
    return (x - mean) / std * mixed_std + mixed_mean
