"""Issue 22: a DFND budget read off the pool. ``kd3.scores.share.relative_density`` (the seeded class-conditional
fit of bn_grid_maha against one Gaussian on the whole pool) checked against torch.distributions on hand-made
features, its share on a pool whose answer is known, and DFND's ``budget: relative_density``."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import MultivariateNormal
from torch.nn import functional as F

from baseline_nets import BNNet, make_context, random_images
from kd3.data.augment import Normalizer
from kd3.data.pool import Pool
from kd3.diagnose import diagnose
from kd3.methods.base import Batch
from kd3.methods.dfnd import DFND, DFNDOptions
from kd3.models import create_model
from kd3.scores import TeacherOutputs, cached_teacher_outputs, compute_score, fitted, teacher_outputs
from kd3.scores.share import gaussian_log_density, relative_density
from kd3.teacher import TeacherInfo, save_teacher


def hand_made(grid: torch.Tensor, prediction: torch.Tensor, num_classes: int = 2) -> TeacherOutputs:
    n = len(grid)
    return TeacherOutputs(logits=F.one_hot(prediction, num_classes).float() * 5.0, feature_l2=torch.ones(n),
                          feature_l1=torch.ones(n), bn_distances={v: torch.zeros(n, 1) for v in ("mean", "kl", "meanlogvar")},
                          bn_layers=["bn"], bn_grid=grid.half())


def shrunk_covariance(residuals: torch.Tensor, shrink: float) -> torch.Tensor:
    cov = residuals.T @ residuals / len(residuals)
    return (1 - shrink) * cov + shrink * torch.diag(cov.diagonal())


def test_gaussian_log_density_is_the_mixture_log_density_up_to_its_constant():
    g = torch.Generator().manual_seed(0)
    d = 3
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)
    means = torch.randn(2, d, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    x = torch.randn(50, d, generator=g, dtype=torch.float64) * 2
    expected = torch.logsumexp(torch.stack([MultivariateNormal(m, cov).log_prob(x) for m in means], dim=1)
                               + weights.log(), dim=1) + 0.5 * d * math.log(2 * math.pi)
    got = gaussian_log_density(x, means, torch.linalg.cholesky(cov), weights.log())
    assert torch.allclose(got, expected, atol=1e-9)


def test_relative_density_is_the_seed_fit_over_the_whole_pool_fit():
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(200, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5])
    prediction = (torch.arange(200) % 3 == 0).long()  # classes with 67 and 133 images
    seed = torch.linspace(1, 0, 200)  # the first images form the seed
    outputs = hand_made(grid, prediction)
    estimate = relative_density(outputs, seed, keep=0.3, shrink=0.1)
    # Reference from torch.distributions: the seed's 60 images (0.3 · 200 > 2 · D), one mean per class, a
    # pooled covariance shrunk 10 % to its diagonal; the background: one Gaussian on all 200, same shrinkage.
    x = outputs.bn_grid.double()
    chosen, y = x[:60], prediction[:60]
    means = torch.stack([chosen[y == k].mean(dim=0) for k in (0, 1)])
    cov = shrunk_covariance(chosen - means[y], 0.1)
    weights = torch.bincount(y).double() / 60
    relevant = torch.logsumexp(torch.stack([MultivariateNormal(m, cov).log_prob(x) for m in means], dim=1)
                               + weights.log(), dim=1)
    background = MultivariateNormal(x.mean(dim=0), shrunk_covariance(x - x.mean(dim=0), 0.1)).log_prob(x)
    # fitted.fit_gaussians adds a 1e-6 relative ridge, hence the tolerance.
    assert torch.allclose(estimate.llr, relevant - background, atol=1e-3)
    assert estimate.share == pytest.approx(float((relevant - background > 0).double().mean()), abs=1 / 200)


def test_share_follows_the_relevant_part_of_a_pool_with_distant_junk():
    g = torch.Generator().manual_seed(2)
    shares = []
    for n_relevant in (60, 120, 240):
        relevant = torch.randn(n_relevant, 4, generator=g) * 0.3 + torch.tensor([1.0, 0, 0, 0]) * (torch.arange(n_relevant) % 2)[:, None]
        junk = torch.randn(300 - n_relevant, 4, generator=g) * 3.0 + 8.0
        grid = torch.cat([relevant, junk])
        prediction = torch.cat([torch.arange(n_relevant) % 2, torch.randint(0, 2, (300 - n_relevant,), generator=g)])
        seed = torch.cat([torch.rand(n_relevant, generator=g) + 1, torch.rand(300 - n_relevant, generator=g)])
        estimate = relative_density(hand_made(grid, prediction), seed, keep=0.1)
        assert bool((estimate.llr[n_relevant:] < 0).all())  # no junk image is counted as relevant
        shares.append(estimate.share)
    # Exact while junk is a large part of the background; where the pool is mostly relevant the background
    # fit is mostly the relevant images themselves, and the narrower seed fit loses their fringe (here 1 of 240).
    assert shares[:2] == pytest.approx([0.2, 0.4], abs=1e-9)
    assert 0.79 <= shares[2] < 0.8


def test_dfnd_relative_density_budget_keeps_the_estimated_share_ranked_by_the_score():
    torch.manual_seed(0)
    ctx = make_context(BNNet().eval(), random_images(60))
    method = DFND(BNNet(), ctx, DFNDOptions(score="bn_grid_maha", budget="relative_density", keep_fraction=0.9))
    kept = method.begin_epoch(0).indices
    outputs = teacher_outputs(ctx.teacher, ctx.images, ctx.normalize)
    share = relative_density(outputs, compute_score(fitted.SEED_SCORE, outputs)).share
    count = max(1, round(share * 60))
    assert method.estimated_share == share and len(kept) == count and count != round(0.9 * 60)
    score = compute_score("bn_grid_maha", outputs)
    assert set(kept.tolist()) == set(torch.sort(-score, stable=True).indices[:count].tolist())
    assert method.epoch_metrics()["dfnd_estimated_share"] == share
    restored = DFND(BNNet(), ctx, DFNDOptions(score="bn_grid_maha", budget="relative_density"))
    restored.load_method_state(method.method_state())
    assert restored.estimated_share == share and restored.keep_count() == count


def test_dfnd_favoured_only_drops_the_kept_images_the_ratio_does_not_favour():
    torch.manual_seed(0)
    ctx = make_context(BNNet().eval(), random_images(60))
    ctx.batch_size = 4
    options = DFNDOptions(score="bn_grid_maha", budget="relative_density", per_class=True)
    budgeted = DFND(BNNet(), ctx, options).begin_epoch(0).indices
    kept = DFND(BNNet(), ctx, dataclasses.replace(options, favoured_only=True)).begin_epoch(0).indices
    outputs = teacher_outputs(ctx.teacher, ctx.images, ctx.normalize)
    llr = relative_density(outputs, compute_score(fitted.SEED_SCORE, outputs)).llr
    assert kept.tolist() == [i for i in budgeted.tolist() if llr[i] > 0]
    assert 0 < len(kept) < len(budgeted)  # this pool has kept images on either side, so the test can fail
    # With a fixed budget it cuts that budget's images the same way.
    fixed = DFNDOptions(score="bn_grid_maha", keep_fraction=0.5)
    budgeted = DFND(BNNet(), ctx, fixed).begin_epoch(0).indices
    kept = DFND(BNNet(), ctx, dataclasses.replace(fixed, favoured_only=True)).begin_epoch(0).indices
    assert len(budgeted) == 30 and kept.tolist() == [i for i in budgeted.tolist() if llr[i] > 0]


def test_dfnd_rest_share_adds_a_fresh_draw_of_the_dropped_images_each_epoch(tmp_path):
    torch.manual_seed(0)
    ctx = make_context(BNNet().eval(), random_images(60), cache_dir=tmp_path)
    options = DFNDOptions(score="bn_grid_maha", keep_fraction=0.5, rest_share=0.2)
    method = DFND(BNNet(), ctx, options)
    first, second = method.begin_epoch(0).indices, method.begin_epoch(1).indices
    kept = DFND(BNNet(), ctx, dataclasses.replace(options, rest_share=0.0)).begin_epoch(0).indices
    assert method.kept.tolist() == kept.tolist() and len(kept) == 30
    for plan in (first, second):
        drawn = sorted(set(plan.tolist()) - set(kept.tolist()))
        # 0.2 of the epoch's images: 0.2 / 0.8 · 30 = 7.5, rounded half to even to 8 (of 38), all from the dropped 30
        assert set(kept.tolist()) <= set(plan.tolist()) and len(plan) == 38 and len(drawn) == 8
        assert plan.tolist() == sorted(plan.tolist())
    assert set(first.tolist()) != set(second.tolist())  # a fresh draw each epoch
    assert method.epoch_metrics()["dfnd_rest_drawn"] == 8
    # The same (seed, epoch) draws the same images: a resumed run and every rank agree.
    resumed = DFND(BNNet(), ctx, options)
    resumed.load_method_state(method.method_state())
    assert resumed.begin_epoch(1).indices.tolist() == second.tolist()
    # The draw trains like a kept image; without rest_share an image outside the selection is refused.
    batch_indices = torch.tensor(sorted(set(second.tolist()) - set(kept.tolist()))[:4])
    batch = Batch(indices=batch_indices, images=ctx.images[batch_indices])
    assert torch.isfinite(resumed.training_step(batch)["kd"])
    plain = DFND(BNNet(), ctx, dataclasses.replace(options, rest_share=0.0))
    plain.begin_epoch(0)
    with pytest.raises(ValueError, match="outside its fixed selection"):
        plain.training_step(batch)


def test_dfnd_rest_share_takes_every_dropped_image_when_there_are_too_few():
    ctx = make_context(BNNet().eval(), random_images(20))
    ctx.batch_size = 4
    method = DFND(BNNet(), ctx, DFNDOptions(keep_fraction=0.9, rest_share=0.5))
    assert len(method.begin_epoch(0).indices) == 20  # 18 kept, asks 18 more, only 2 dropped


def test_dfnd_whole_pool_epochs_train_on_every_image_before_the_selection():
    ctx = make_context(BNNet().eval(), random_images(40))
    ctx.batch_size = 4
    options = DFNDOptions(keep_fraction=0.5, whole_pool_epochs=2)
    method = DFND(BNNet(), ctx, options)
    plans = [method.begin_epoch(epoch).indices for epoch in range(4)]
    kept = DFND(BNNet(), ctx, dataclasses.replace(options, whole_pool_epochs=0)).begin_epoch(0).indices
    assert [p.tolist() for p in plans[:2]] == [list(range(40))] * 2
    assert [p.tolist() for p in plans[2:]] == [kept.tolist()] * 2 and len(kept) == 20
    dropped = torch.tensor(sorted(set(range(40)) - set(kept.tolist()))[:4])
    assert torch.isfinite(method.training_step(Batch(indices=dropped, images=ctx.images[dropped]))["kd"])
    with pytest.raises(ValueError, match="whole_pool_epochs must be 0 or more, got -1"):
        DFND(BNNet(), ctx, DFNDOptions(whole_pool_epochs=-1))


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_dfnd_rejects_a_rest_share_outside_0_1(share):
    ctx = make_context(BNNet().eval(), random_images(10))
    with pytest.raises(ValueError, match=rf"rest_share must lie in \[0, 1\), got {share}"):
        DFND(BNNet(), ctx, DFNDOptions(rest_share=share))


def test_dfnd_refuses_an_estimated_budget_smaller_than_one_batch():
    torch.manual_seed(0)
    ctx = make_context(BNNet().eval(), random_images(60))
    outputs = teacher_outputs(ctx.teacher, ctx.images, ctx.normalize)
    count = max(1, round(relative_density(outputs, compute_score(fitted.SEED_SCORE, outputs)).share * 60))
    ctx.batch_size = count + 1
    method = DFND(BNNet(), ctx, DFNDOptions(score="bn_grid_maha", budget="relative_density"))
    with pytest.raises(ValueError, match=rf"keeps {count} of 60 pool images .*fewer than one batch \(train.batch_size={count + 1}\)"):
        method.begin_epoch(0)
    ctx.batch_size = count
    assert len(DFND(BNNet(), ctx, DFNDOptions(score="bn_grid_maha", budget="relative_density")).begin_epoch(0).indices) == count


def test_dfnd_rejects_an_unknown_budget():
    ctx = make_context(BNNet().eval(), random_images(10))
    with pytest.raises(ValueError, match="budget"):
        DFND(BNNet(), ctx, DFNDOptions(budget="adaptive"))


def test_diagnose_reports_the_estimated_relevant_share(tmp_path):
    torch.manual_seed(0)
    net = create_model("lenet5_half_bn", num_classes=10, in_channels=1, image_size=28).eval()
    path = tmp_path / "teacher.pt"
    save_teacher(path, net, TeacherInfo(arch="lenet5_half_bn", num_classes=10, in_channels=1, image_size=28,
                                        classes=[f"c{k}" for k in range(10)], mean=[0.3], std=[0.3], data="synthetic",
                                        test_accuracy=0.1, val_accuracy=0.1))
    images = torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:40] //= 4
    pool = Pool.unlabelled(images, "folder")
    files = diagnose(pool, path, tmp_path / "out", tmp_path / "cache", "folder")
    outputs = cached_teacher_outputs(pool, net, Normalizer((0.3,), (0.3,)), tmp_path / "cache")
    share = relative_density(outputs, compute_score(fitted.SEED_SCORE, outputs)).share
    assert files.diagnosis.estimated_share == share
    assert f"Estimated relevant share: {share:.3f} of the pool" in files.markdown.read_text()
