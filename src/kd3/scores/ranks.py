"""Rank combinations of scores: scales differ wildly (a probability, a norm, a KL), ranks do not.

Each component is turned into its pool percentile r ∈ (0, 1] (rank / N, ties sharing their mean
rank, higher score → higher r); then

- mean-rank: r = mean over components — an image needs to look good on average;
- min-rank:  r = min over components — an image is only as relevant as its worst component, so
  junk that fools one score (confident "bag" crops, bright digits with BN-like statistics) is
  still caught by the other.
"""
from __future__ import annotations

import torch


def percentile_ranks(score: torch.Tensor) -> torch.Tensor:
    """rank / N in (0, 1] (float64), ties getting their mean rank; higher score → higher value."""
    n = score.numel()
    values, order = torch.sort(score.double(), stable=True)
    _, group, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()  # 1-based rank of each tie group's last member
    mean_rank = last - (counts.double() - 1) / 2
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = mean_rank[group]
    return ranks / max(n, 1)


def mean_rank(scores: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([percentile_ranks(s) for s in scores]).mean(dim=0)


def min_rank(scores: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([percentile_ranks(s) for s in scores]).min(dim=0).values
