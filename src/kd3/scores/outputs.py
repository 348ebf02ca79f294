"""One teacher inference pass over a pool, with hooks, keeping what every score needs.

What is kept per image is deliberately small, so a pool of millions still fits: the logits, the L2
and L1 norms of the penultimate vector h (the input of ``net.classifier``, i.e. ``Net.pool``'s
output), and for every BatchNorm2d layer each BatchNorm-distance variant. Per-image per-channel
statistics would be N × Σ channels (thousands of channels for a ResNet), the distances are N × L.

One compact feature vector per image is kept too, for the scores that fit a density on the pool
(``fitted``): ``bn_grid``, each BatchNorm layer's input averaged over a 2×2 spatial grid per channel
(4·C values per layer, concatenated in run order), stored as float16. When the layers have more than
``BN_GRID_MAX_DIM`` values in all (a ResNet), they are reduced to that many by one fixed Gaussian
random projection (seed ``BN_GRID_PROJECTION_SEED``), which keeps a pool of millions within memory:
LeNet-5-BN's 88 values are kept exactly, 176 bytes per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kd3.data.augment import Normalizer
from kd3.data.storage import PoolImages
from kd3.engine.distributed import map_rows
from kd3.scores.formulas import BN_VARIANTS, bn_distance
from kd3.utils.progress import progress


@dataclass
class TeacherOutputs:
    logits: torch.Tensor  # N×K float32
    feature_l2: torch.Tensor  # N, ‖h‖₂ of the classifier's input
    feature_l1: torch.Tensor  # N, ‖h‖₁ (GradNorm's factor)
    bn_distances: dict[str, torch.Tensor]  # variant -> N×L, one column per BatchNorm2d layer in run order
    bn_layers: list[str]  # the L layer names, in the order they ran
    # N×D float16: BN inputs' 2×2-grid channel means (see the module docstring); None when not recorded
    bn_grid: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.logits.shape[0]

    def to_record(self) -> dict[str, Any]:
        """Plain tensors, strings and dicts: loadable with ``torch.load(weights_only=True)``."""
        return {"logits": self.logits, "feature_l2": self.feature_l2, "feature_l1": self.feature_l1,
                "bn_distances": dict(self.bn_distances), "bn_layers": list(self.bn_layers),
                "bn_grid": self.bn_grid}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TeacherOutputs:
        return cls(logits=record["logits"], feature_l2=record["feature_l2"], feature_l1=record["feature_l1"],
                   bn_distances=dict(record["bn_distances"]), bn_layers=list(record["bn_layers"]),
                   bn_grid=record.get("bn_grid"))


BN_GRID = 2  # the spatial grid (BN_GRID × BN_GRID cells) each BatchNorm input channel is averaged over
BN_GRID_MAX_DIM = 256  # more values than this are randomly projected down to it
BN_GRID_PROJECTION_SEED = 0
_FLOAT16_MAX = 65504.0


def grid_means(bn_input: torch.Tensor) -> torch.Tensor:
    """N×(C·BN_GRID²): a BN input (N×C×H×W) averaged over a BN_GRID×BN_GRID grid per channel, channel-major."""
    return F.adaptive_avg_pool2d(bn_input.float(), BN_GRID).flatten(1)


def grid_features(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """N×D float16: the layers' ``grid_means`` concatenated in run order, projected to BN_GRID_MAX_DIM
    values when D is larger."""
    grid = torch.cat(per_layer, dim=1)
    if grid.shape[1] > BN_GRID_MAX_DIM:
        grid = grid @ projection(grid.shape[1], BN_GRID_MAX_DIM).to(grid.device)
    return grid.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).half()


@lru_cache(maxsize=4)
def projection(dim: int, out_dim: int) -> torch.Tensor:
    """A fixed dim × out_dim Gaussian matrix scaled by 1/sqrt(out_dim), the same for every pool and run."""
    generator = torch.Generator().manual_seed(BN_GRID_PROJECTION_SEED)
    return torch.randn(dim, out_dim, generator=generator) / out_dim ** 0.5


class _Recorder:
    """Forward pre-hooks that turn one batch's classifier input and BN inputs into per-image numbers."""

    def __init__(self, net: nn.Module):
        classifier = getattr(net, "classifier", None)
        if not isinstance(classifier, nn.Linear):
            raise ValueError(f"{type(net).__name__} has no nn.Linear `classifier`; relevance scores need a kd3 Net")
        self.names = {module: name for name, module in net.named_modules() if isinstance(module, nn.BatchNorm2d)}
        self.handles = [classifier.register_forward_pre_hook(self._classifier_input)]
        self.handles += [layer.register_forward_pre_hook(self._batchnorm_input) for layer in self.names]
        self.features: list[torch.Tensor] = []  # per batch: N×2 (L2, L1)
        self.batchnorm: list[tuple[str, dict[str, torch.Tensor]]] = []  # per layer run, this batch
        self.grids: list[torch.Tensor] = []  # per layer run, this batch: grid_means of its input

    def _classifier_input(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        h = inputs[0].float().flatten(1)
        self.features.append(torch.stack([h.norm(dim=1), h.abs().sum(dim=1)], dim=1).cpu())

    def _batchnorm_input(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        mean, var = x.mean(dim=(2, 3)), x.var(dim=(2, 3), unbiased=False)
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"BatchNorm layer {self.names[module]!r} tracks no running statistics")
        self.batchnorm.append((self.names[module], {
            v: bn_distance(mean, var, module.running_mean, module.running_var, module.eps, v).cpu()
            for v in BN_VARIANTS}))
        self.grids.append(grid_means(x))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def teacher_outputs(net: nn.Module, images: PoolImages, normalize: Normalizer, batch_size: int = 1024,
                    device: torch.device | str = "cpu", show_progress: bool = False) -> TeacherOutputs:
    """Run ``net`` once over uint8 ``images`` (clean views, eval mode) and keep what the scores need.

    The pass streams ``images`` in batches (a pool on disk is never loaded whole) and, under
    torchrun, is sharded over ranks and gathered (``distributed.map_rows``). The network's
    train/eval mode is restored afterwards; its weights and running statistics are never changed.
    """
    if len(images) == 0:
        raise ValueError("no images to score")
    was_training = net.training
    net.eval()
    recorder = _Recorder(net)
    layers: list[str] = []

    def compute(start: int, stop: int) -> list[torch.Tensor]:
        recorder.features, recorder.batchnorm, recorder.grids = [], [], []
        x = normalize(images[start:stop].to(device))
        logits = net(x).float().cpu()
        if len(recorder.features) != 1:
            raise ValueError(f"the classifier of {type(net).__name__} ran {len(recorder.features)} times in one "
                             "forward; relevance scores need it to run exactly once")
        layers[:] = [name for name, _ in recorder.batchnorm]
        per_variant = [torch.stack([d[v] for _, d in recorder.batchnorm], dim=1) if recorder.batchnorm
                       else torch.zeros(len(x), 0) for v in BN_VARIANTS]
        grid = grid_features(recorder.grids).cpu() if recorder.grids else torch.zeros(len(x), 0, dtype=torch.float16)
        return [logits, recorder.features[0], grid, *per_variant]

    try:
        logits, norms, grid, *distances = map_rows(
            len(images), batch_size, compute,
            lambda starts: progress(starts, desc="teacher scores", enabled=show_progress))
    finally:
        recorder.remove()
        net.train(was_training)
    return TeacherOutputs(logits=logits, feature_l2=norms[:, 0], feature_l1=norms[:, 1],
                          bn_distances=dict(zip(BN_VARIANTS, distances)), bn_layers=list(layers),
                          bn_grid=grid if layers else None)
