"""DeepInversion's feature-statistics regulariser, measured with forward hooks on BatchNorm2d layers.

For every ``BatchNorm2d`` l of a network, the hook takes the layer's *input* x_l (N×C×H×W) and adds

    ‖μ_l(x) − running_mean_l‖₂ + ‖σ²_l(x) − running_var_l‖₂

with μ_l, σ²_l the per-channel mean and biased variance over batch and positions (Yin et al.,
CVPR 2020, eq. 3; as in NVlabs/DeepInversion's ``DeepInversionFeatureHook``). The hooks only read:
they never change the network, and they are removed when the ``with`` block ends.
"""
from __future__ import annotations

import torch
from torch import nn


def batchnorm_layers(net: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over batch and positions of an N×C×H×W tensor."""
    x = x.float()
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


def statistics_distance(x: torch.Tensor, layer: nn.BatchNorm2d) -> torch.Tensor:
    mean, var = batch_statistics(x)
    return torch.linalg.vector_norm(mean - layer.running_mean.float()) + \
        torch.linalg.vector_norm(var - layer.running_var.float())


class BatchNormStatistics:
    """Context manager: while active, every forward of ``net`` records the BN-statistics distance.

    ::

        with BatchNormStatistics(teacher) as stats:
            logits = teacher(x)
            r_feature = stats.pop()  # sum over layers, differentiable w.r.t. x
    """

    def __init__(self, net: nn.Module):
        self.layers = batchnorm_layers(net)
        if not self.layers:
            raise ValueError(f"{type(net).__name__} has no BatchNorm2d layer to take statistics from")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._terms: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        del output
        self._terms.append(statistics_distance(inputs[0], module))

    def __enter__(self) -> "BatchNormStatistics":
        self._terms = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def pop(self) -> torch.Tensor:
        """The summed distance of every BN layer run since the last ``pop`` (then forgets them)."""
        if not self._terms:
            raise RuntimeError("no BatchNorm layer ran inside the BatchNormStatistics block")
        total = torch.stack(self._terms).sum()
        self._terms = []
        return total
