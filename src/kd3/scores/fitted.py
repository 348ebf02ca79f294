"""Relevance scores fitted on the pool itself, from the teacher's outputs alone (no labels, no provenance).

``seeded_mahalanobis`` (registered as ``bn_grid_maha``) is a self-training density score:

1. **Seed.** A fixed data-free score (``SEED_SCORE``, mean rank of energy and BN mean shift) ranks
   the pool; its top ``keep`` fraction (5 %, at least 2·D images) is taken as confidently relevant.
   On fashion-wild that set is 93 % relevant although the seed score's AUROC is only 0.84: the seed
   fails in the middle of its ranking, not at the top.
2. **Fit.** On the seed images' ``TeacherOutputs.bn_grid`` vectors x (each BatchNorm input's channel
   means over a 2×2 spatial grid), one Gaussian per teacher-predicted class k with mean μ_k and a
   covariance Σ shared by all classes (the class-conditional, tied-covariance model of Lee et al.,
   NeurIPS 2018), Σ shrunk towards its own diagonal: Σ ← (1 − λ) Σ + λ diag(Σ), λ = ``shrink``.
   Classes with fewer than 2 seed images get no Gaussian (the others still cover them).
3. **Score.** −min_k (x − μ_k)ᵀ Σ⁻¹ (x − μ_k) for every pool image: higher = closer to what the
   teacher's most typical in-distribution images look like at its BatchNorm inputs.

Unlike the running-statistics BN scores, this uses the joint (correlated) distribution of the channel
means, per image and per quadrant, so it sees *where* strokes are (a centred thin digit vs a garment
filling the frame), which the per-channel running statistics cannot. Every choice (the features, the
2×2 grid, keep = 5 %, λ = 0.1, a global rather than per-class seed, no further self-training rounds:
a second round lowered the AUROC) was made on fashion-wild only; see ``results/relevance.md``.

It is a pure, deterministic function of ``TeacherOutputs`` (float64 linear algebra, no random draws),
so ``compute_score(name, outputs)`` works unchanged wherever a base score does.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kd3.scores.outputs import TeacherOutputs

# The seed is named here, not taken from registry.DEFAULT_SCORE, so that making this score the default
# does not change it (or make it seed itself).
SEED_SCORE = "meanrank:energy+bn_mean_all"
KEEP = 0.05
SHRINK = 0.1
_RIDGE = 1e-6  # relative to the mean variance: keeps Σ invertible when a feature is constant
_CHUNK = 65536  # rows per block when measuring distances (N × classes would not fit for millions)


def seed_indices(seed: torch.Tensor, keep: float, dim: int) -> torch.Tensor:
    """The ``max(ceil(keep · N), min(N, 2 · dim))`` highest-scoring images (ties to the lower index)."""
    n = seed.numel()
    count = min(n, max(math.ceil(keep * n), 2 * dim))
    return torch.sort(-seed.double(), stable=True).indices[:count]


def fit_gaussians(features: torch.Tensor, prediction: torch.Tensor, chosen: torch.Tensor,
                  shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (M×D, one per class with ≥ 2 chosen images; the chosen images' mean if none has)
    and the Cholesky factor (D×D, lower) of the pooled within-class covariance, shrunk to its diagonal."""
    x, y = features[chosen].double(), prediction[chosen]
    means, residuals = [], []
    for k in torch.unique(y).tolist():
        members = x[y == k]
        if len(members) >= 2:
            means.append(members.mean(dim=0))
            residuals.append(members - means[-1])
    if not means:
        means, residuals = [x.mean(dim=0)], [x - x.mean(dim=0)]
    r = torch.cat(residuals)
    cov = r.T @ r / max(len(r), 1)
    diagonal = torch.diag(cov.diagonal())
    cov = (1 - shrink) * cov + shrink * diagonal
    scale = float(cov.diagonal().mean()) if cov.numel() else 0.0
    cov = cov + (_RIDGE * scale + 1e-12) * torch.eye(len(cov), dtype=cov.dtype)
    return torch.stack(means), torch.linalg.cholesky(cov)


def min_mahalanobis(features: torch.Tensor, means: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
    """min over the means of the squared Mahalanobis distance, per row (float64)."""
    white_means = torch.linalg.solve_triangular(cholesky, means.T, upper=False).T  # M×D: L⁻¹ μ_k
    mean_norms = (white_means ** 2).sum(dim=1)
    out = torch.empty(len(features), dtype=torch.float64)
    for start in range(0, len(features), _CHUNK):
        x = features[start:start + _CHUNK].double()
        white = torch.linalg.solve_triangular(cholesky, x.T, upper=False).T  # rows L⁻¹ x
        d = (white ** 2).sum(dim=1, keepdim=True) - 2 * white @ white_means.T + mean_norms
        out[start:start + _CHUNK] = d.min(dim=1).values.clamp_min(0)
    return out


def seeded_mahalanobis(outputs: TeacherOutputs, seed: torch.Tensor, keep: float = KEEP,
                       shrink: float = SHRINK) -> torch.Tensor:
    """−(min-class Mahalanobis distance of ``bn_grid``) under Gaussians fitted on ``seed``'s top images."""
    if outputs.bn_grid is None or outputs.bn_grid.shape[1] == 0:
        raise ValueError("bn_grid_maha needs TeacherOutputs.bn_grid (a teacher with at least one BatchNorm2d "
                         "layer, and outputs from kd3.scores.teacher_outputs)")
    features = outputs.bn_grid
    chosen = seed_indices(seed, keep, features.shape[1])
    means, cholesky = fit_gaussians(features, outputs.logits.argmax(dim=1), chosen, shrink)
    return -min_mahalanobis(features, means, cholesky)


def fitted_scores(seed_fn: Callable[[TeacherOutputs], torch.Tensor]) -> dict[str, Callable[[TeacherOutputs],
                                                                                         torch.Tensor]]:
    """The fitted scores by name, given how to compute ``SEED_SCORE`` (the registry passes its own)."""
    return {"bn_grid_maha": lambda o: seeded_mahalanobis(o, seed_fn(o))}
