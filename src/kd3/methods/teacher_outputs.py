"""Teacher logits for a training batch: from a cache of fixed views, or a forward pass per step.

Shared by every method that distils logits on pool images (blind KD, DFND, references).
"""
from __future__ import annotations

import torch

from kd3.data.augment import FixedViews
from kd3.data.mixing import Mixing
from kd3.methods.base import Batch, DistillContext
from kd3.methods.view_cache import ViewStore, build_view_cache
from kd3.utils.progress import progress


def check_mixing(mixing: Mixing, num_views: int) -> None:
    if mixing.active and num_views > 0:
        raise ValueError(f"mix={mixing.kind!r} runs the teacher on every mixed batch, so cached teacher "
                         f"views cannot be used: set teacher_views: 0 (got {num_views})")


class TeacherLogits:
    """Produces (student input, teacher logits) for a batch of pool images.

    With ``num_views > 0`` the teacher runs once over K fixed augmented views of the whole pool
    (lazily, on first use) into a file on disk (``kd3.methods.view_cache``: a process holds O(batch) of
    it, whatever the pool size) and each step draws one cached view per image; with 0 the teacher
    runs on a fresh random augmentation every step. With ``mixing`` active the teacher runs every
    step on the mixed batch (the student's exact input), so it requires ``num_views = 0``.
    """

    def __init__(self, ctx: DistillContext, num_views: int, mixing: Mixing = Mixing()):
        check_mixing(mixing, num_views)
        self.ctx = ctx
        self.num_views = num_views
        self.mixing = mixing
        self.views = FixedViews(ctx.pool_size, num_views, ctx.augment, seed=ctx.seed) if num_views > 0 else None
        self.cache: ViewStore | None = None

    @torch.inference_mode()
    def _fill_cache(self) -> ViewStore:
        assert self.views is not None
        ctx, views = self.ctx, self.views

        def compute(start: int, stop: int) -> list[torch.Tensor]:
            # The views are fixed per image (seeded), so a shard computed on any rank is the same.
            idx = torch.arange(start, stop)
            images = ctx.images[start:stop].to(ctx.device)
            return [torch.stack([ctx.teacher(ctx.normalize(views.apply(images, idx, torch.full_like(idx, v)))).float().cpu()
                                 for v in range(self.num_views)], dim=1)]

        (cache,) = build_view_cache(ctx.pool_size, self.num_views, 1024, ctx.cache_dir, compute,
                                    lambda starts: progress(starts, desc="teacher views", enabled=ctx.progress))
        return cache

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        if self.views is None:
            x = self.mixing(ctx.normalize(ctx.augment(batch.images)))
            with torch.no_grad():
                return x, ctx.teacher(x)
        if self.cache is None:
            self.cache = self._fill_cache()
        views = torch.randint(0, self.num_views, (len(batch.indices),))
        x = ctx.normalize(self.views.apply(batch.images, batch.indices, views))
        return x, self.cache.read(batch.indices, views).to(ctx.device)
