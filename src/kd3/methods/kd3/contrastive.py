"""Instance alignment (docs/method.md §3): an embedding head and the NT-Xent (SimCLR) loss between each
image and its MixDistribution-perturbed version."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def global_average(feature_map: torch.Tensor) -> torch.Tensor:
    """The C-dim pooled vector the heads read: GAP of the last feature map (Linear(C → d) in the
    spec), whatever the network's own ``pool`` does (for LeNet that is flatten + its fc layers).
    In float32: a cached teacher map is fp16."""
    return feature_map.float().mean(dim=(2, 3))


class EmbeddingHead(nn.Module):
    """Linear(C → d), then ℓ2-normalise."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(pooled), dim=1)


def nt_xent(anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2B stacked, normalised embeddings: for each of them the positive is the same
    image's other view and the denominator sums over all 2B−1 others (positive included); the mean
    over all 2B anchors."""
    batch = anchors.shape[0]
    embeddings = torch.cat([anchors, positives])
    similarity = embeddings @ embeddings.t() / temperature
    self_mask = torch.eye(2 * batch, dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    positive_index = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(similarity.device)
    return F.cross_entropy(similarity, positive_index)
