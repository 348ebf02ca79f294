"""How much of a pool is relevant, from the teacher alone: a density *ratio* instead of a density.

``bn_grid_maha`` ranks the pool but says nothing about where to cut it. ``relative_density`` answers
that with the relative-Mahalanobis idea of Ren et al. (2021, "A Simple Fix to Mahalanobis Distance
for Improving Near-OOD Detection"): compare the class-conditional density fitted on the confidently
relevant seed (the very fit of ``bn_grid_maha``: ``fitted.seeded_mahalanobis``'s Gaussians) with a
*background* density fitted on the whole pool (one Gaussian, the same covariance shrinkage):

    LLR(x) = log p_rel(x) − log p_bg(x),
    log p_rel(x) = logsumexp_k [log π_k − ½ (x − μ_k)ᵀ Σ⁻¹ (x − μ_k)] − ½ log det Σ,
    log p_bg(x)  = −½ (x − μ_0)ᵀ Σ_0⁻¹ (x − μ_0) − ½ log det Σ_0,

with π_k the seed's share of teacher-predicted class k (the common −D/2 log 2π cancels). An image
whose ratio favours the relevant fit (LLR > 0) is counted as relevant, so the estimated relevant share
is the pool's fraction with LLR > 0. The background tracks the pool: junk it holds widens it, and the
share grows with the pool's relevant part instead of being a fixed budget.

Measured on fashion-wild's irrelevant-fraction sweep (provenance used only to measure; see
results/issue22/share_estimates.md): true share 1.00 / 0.75 / 0.50 / 0.30 / 0.10 reads as 0.46 / 0.44 /
0.38 / 0.32 / 0.34. An *under*-estimate where the pool is mostly relevant (the seed fit is narrower
than all relevant images, so their fringe favours the background) and an over-estimate where junk
dominates (the seed itself is then part junk): a larger budget than a fixed 30 % where junk is
scarce, no smaller one where it is everything.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kd3.scores import fitted
from kd3.scores.outputs import TeacherOutputs

_CHUNK = 65536  # rows per block (N × classes distances would not fit for millions of images)


@dataclass
class ShareEstimate:
    """The pool's estimated relevant share and the per-image log density ratio it comes from."""

    share: float  # fraction of the pool with llr > 0
    llr: torch.Tensor  # N, float64: log p_rel(x) − log p_bg(x); > 0 = the ratio favours "relevant"


def gaussian_log_density(features: torch.Tensor, means: torch.Tensor, cholesky: torch.Tensor,
                         log_weights: torch.Tensor) -> torch.Tensor:
    """log Σ_k w_k N(x; μ_k, LLᵀ) per row, without the −D/2 log 2π constant (float64)."""
    white_means = torch.linalg.solve_triangular(cholesky, means.double().T, upper=False).T
    log_det = 2 * torch.log(cholesky.diagonal()).sum()
    out = torch.empty(len(features), dtype=torch.float64)
    for start in range(0, len(features), _CHUNK):
        x = features[start:start + _CHUNK].double()
        white = torch.linalg.solve_triangular(cholesky, x.T, upper=False).T
        d2 = ((white ** 2).sum(dim=1, keepdim=True) - 2 * white @ white_means.T + (white_means ** 2).sum(dim=1))
        out[start:start + _CHUNK] = torch.logsumexp(log_weights - 0.5 * d2.clamp_min(0), dim=1)
    return out - 0.5 * log_det


def relative_density(outputs: TeacherOutputs, seed: torch.Tensor, keep: float = fitted.KEEP,
                     shrink: float = fitted.SHRINK) -> ShareEstimate:
    """The seeded class-conditional fit of ``bn_grid_maha`` against one Gaussian fitted on the whole pool."""
    if outputs.bn_grid is None or outputs.bn_grid.shape[1] == 0:
        raise ValueError("relative_density needs TeacherOutputs.bn_grid (a teacher with at least one BatchNorm2d "
                         "layer, and outputs from kd3.scores.teacher_outputs)")
    features = outputs.bn_grid
    prediction = outputs.logits.argmax(dim=1)
    chosen = fitted.seed_indices(seed, keep, features.shape[1])
    means, cholesky = fitted.fit_gaussians(features, prediction, chosen, shrink)
    # fit_gaussians keeps, in ascending class order, the classes with at least 2 seed images (or one
    # mean of all seed images when none has): weight each mean by its seed images.
    counts = torch.bincount(prediction[chosen]).double()
    counts = counts[counts >= 2] if bool((counts >= 2).any()) else counts.sum().reshape(1)
    log_weights = torch.log(counts / counts.sum())
    relevant = gaussian_log_density(features, means, cholesky, log_weights)
    everything = torch.arange(len(features))
    bg_mean, bg_cholesky = fitted.fit_gaussians(features, torch.zeros_like(prediction), everything, shrink)
    background = gaussian_log_density(features, bg_mean, bg_cholesky, torch.zeros(1, dtype=torch.float64))
    llr = relevant - background
    return ShareEstimate(share=float((llr > 0).double().mean()), llr=llr)
