"""Each relevance score as a formula on tensors: the teacher pass stores their inputs, these finish them.

Convention for every score kd3 names: **higher = more relevant** (more like the teacher's training
data). Distances are therefore negated where they become scores (see ``registry``); the functions
here return the quantities as the literature defines them.
"""
from __future__ import annotations

import torch

BN_VARIANTS = ("mean", "kl", "meanlogvar")
LAYER_SETS = ("early", "late", "all")


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """max_k softmax(z)_k (Hendrycks & Gimpel, 2017)."""
    return torch.softmax(logits.float(), dim=1).max(dim=1).values


def energy(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp_k z_k, the negative free energy at T = 1 (Liu et al., 2020)."""
    return torch.logsumexp(logits.float(), dim=1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """max_k z_k (Hendrycks et al., 2022)."""
    return logits.float().max(dim=1).values


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(z) in nats (used by the diagnosis, not a named score)."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def gradnorm(logits: torch.Tensor, feature_l1: torch.Tensor) -> torch.Tensor:
    """GradNorm (Huang, Geng & Li, NeurIPS 2021) at T = 1, in closed form.

    The score is the L1 norm of ∂L/∂W for the last linear layer z = W h + b, with
    L = KL(u ‖ softmax(z)) and u uniform over the K classes (the paper's cross-entropy against
    uniform targets differs by the constant log K, so the gradient is the same). Since
    ∂L/∂z = softmax(z) − u and ∂L/∂W = (softmax(z) − u) hᵀ is an outer product, its entrywise L1
    norm factors: ‖softmax(z) − u‖₁ · ‖h‖₁. No backward pass is needed, so it fits in the one
    inference pass (only ‖h‖₁ of the penultimate vector has to be kept).
    """
    p = torch.softmax(logits.float(), dim=1)
    return (p - 1.0 / p.shape[1]).abs().sum(dim=1) * feature_l1.float()


def bn_distance(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                eps: float, variant: str) -> torch.Tensor:
    """Per-image distance of one BatchNorm layer's input statistics from the layer's running ones.

    ``mean``/``var`` (N×C) are each image's per-channel spatial mean and biased variance at the
    layer's input; the running statistics (C) summarise the teacher's training data there. Both
    variances get the layer's eps (what BatchNorm itself adds), so a constant channel stays finite.
    Per channel, with μ, v the image's and m, s² the running statistics:

    - ``mean``:        (μ − m)² / (s² + ε)                      (mean shift in running-std units)
    - ``kl``:          KL(N(μ, v + ε) ‖ N(m, s² + ε))
                       = ½ [log((s² + ε)/(v + ε)) + (v + ε + (μ − m)²)/(s² + ε) − 1]
    - ``meanlogvar``:  (μ − m)²/(s² + ε) + log²((v + ε)/(s² + ε))

    Averaged over channels, so layers of different widths weigh alike. All three are 0 exactly when
    the image's statistics equal the running ones.
    """
    if variant not in BN_VARIANTS:
        raise ValueError(f"BatchNorm distance variant {variant!r}; valid: {', '.join(BN_VARIANTS)}")
    v = var.float() + eps
    s2 = running_var.float() + eps
    shift = (mean.float() - running_mean.float()) ** 2 / s2
    if variant == "mean":
        per_channel = shift
    elif variant == "kl":
        per_channel = 0.5 * (torch.log(s2 / v) + v / s2 - 1.0) + 0.5 * shift
    else:
        per_channel = shift + torch.log(v / s2) ** 2
    return per_channel.mean(dim=1)


def layer_set(num_layers: int, name: str) -> list[int]:
    """Indices of the BN layers (in the order they ran) that a layer set names.

    ``early`` = the first half (at least one layer), ``late`` = the rest (the last layer when there
    is only one), ``all`` = every layer. For LeNet-5-BN's two layers: early = conv1's, late = conv2's.
    """
    if num_layers < 1:
        raise ValueError("the teacher has no BatchNorm2d layer; BatchNorm-statistics scores need one")
    half = max(1, num_layers // 2)
    sets = {"early": list(range(half)), "late": list(range(min(half, num_layers - 1), num_layers)),
            "all": list(range(num_layers))}
    if name not in sets:
        raise ValueError(f"BatchNorm layer set {name!r}; valid: {', '.join(LAYER_SETS)}")
    return sets[name]

