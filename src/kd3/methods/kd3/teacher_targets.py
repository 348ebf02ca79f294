"""The teacher's feature map and logits on a training batch: a forward per step, or a cache over K
fixed augmented views of the pool.

KD³ aligns feature maps, so unlike ``TeacherLogits`` the cache must hold F_T too. It holds them in
fp16, on disk (``kd3.methods.view_cache``: files in the kd3 cache folder, read a batch of rows at a
time, so a process holds O(batch) of them): pool_size × K × (C_T·H_T·W_T · 2 + num_classes · 4)
bytes, e.g. 20k images × 8 views of a 64×7×7 map ≈ 1.0 GB, but 1.28M ImageNet-32 images × 8 views
of ResNet-34's 512×4×4 map ≈ 168 GB. A cache over the size limit (``teacher_cache_gb``, now disk
space) is not built: the teacher runs every step instead, with a warning. With the teacher-side
contrastive term on, the teacher still runs on the perturbed batch every step; the cache saves only
the clean forward.
"""
from __future__ import annotations

import warnings

import torch

from kd3.data.augment import FixedViews
from kd3.methods.base import Batch, DistillContext
from kd3.methods.view_cache import ViewStore, build_view_cache
from kd3.utils.progress import progress


def cache_bytes(pool_size: int, num_views: int, feature_shape: tuple[int, int, int], num_classes: int) -> int:
    channels, height, width = feature_shape
    return pool_size * num_views * (channels * height * width * 2 + num_classes * 4)


class TeacherTargets:
    """Produces (student input x, teacher feature map F_T, teacher logits z_T) for a batch."""

    def __init__(self, ctx: DistillContext, num_views: int, feature_shape: tuple[int, int, int],
                 max_gb: float):
        self.ctx = ctx
        needed = cache_bytes(ctx.pool_size, num_views, feature_shape, ctx.num_classes)
        if num_views > 0 and needed > max_gb * 1e9:
            warnings.warn(f"kd3: caching the teacher on {num_views} views needs {needed / 1e9:.1f} GB "
                          f"(> teacher_cache_gb={max_gb}); running the teacher every step instead",
                          stacklevel=3)
            num_views = 0
        self.num_views = num_views
        self.feature_shape = feature_shape
        # FixedViews has its own seeded generator: building it does not touch the global RNG.
        self.views = FixedViews(ctx.pool_size, num_views, ctx.augment, seed=ctx.seed) if num_views > 0 else None
        self.maps: ViewStore | None = None
        self.logits: ViewStore | None = None

    @property
    def cached(self) -> bool:
        return self.views is not None

    def teacher_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self.ctx.teacher
        feature_map = teacher.features(x)
        return feature_map, teacher.classifier(teacher.pool(feature_map))

    @torch.inference_mode()
    def _fill_cache(self) -> None:
        assert self.views is not None
        ctx, views = self.ctx, self.views

        def compute(start: int, stop: int) -> list[torch.Tensor]:
            # The views are fixed per image (seeded), so a shard computed on any rank is the same.
            idx = torch.arange(start, stop)
            images = ctx.images[start:stop].to(ctx.device)
            outputs = [self.teacher_forward(ctx.normalize(views.apply(images, idx, torch.full_like(idx, v))))
                       for v in range(self.num_views)]
            return [torch.stack([m.half().cpu() for m, _ in outputs], dim=1),
                    torch.stack([z.float().cpu() for _, z in outputs], dim=1)]

        self.maps, self.logits = build_view_cache(
            ctx.pool_size, self.num_views, ctx.batch_size, ctx.cache_dir, compute,
            lambda starts: progress(starts, desc="kd3 teacher views", enabled=ctx.progress))

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        if self.views is None:
            x = ctx.normalize(ctx.augment(batch.images))
            with torch.no_grad():  # not inference_mode: F_T enters the autograd graph as a constant
                feature_map, logits = self.teacher_forward(x)
            return x, feature_map, logits
        if self.maps is None:
            self._fill_cache()
        assert self.maps is not None and self.logits is not None
        views = torch.randint(0, self.num_views, (len(batch.indices),))
        x = ctx.normalize(self.views.apply(batch.images, batch.indices, views))
        idx = batch.indices.cpu()
        return x, self.maps.read(idx, views).to(ctx.device), self.logits.read(idx, views).to(ctx.device)
