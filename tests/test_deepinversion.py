import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baseline_nets import BNNet, PlainNet, assert_same_tensors, make_context, random_images, snapshot, train_epochs
from kd3.methods.base import get_method
from kd3.methods.bn_hooks import BatchNormStatistics, batch_statistics
from kd3.methods.deepinversion import DeepInversion, DeepInversionOptions, image_priors


def set_running_stats_to(net: nn.Module, x: torch.Tensor) -> None:
    """Make every BN layer's running statistics equal the statistics of its own input on batch x."""

    def pre_hook(module, inputs):
        mean, var = batch_statistics(inputs[0])
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)

    handles = [m.register_forward_pre_hook(pre_hook) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net.eval()
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()


def bn_loss(net: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), BatchNormStatistics(net) as stats:
        net(x)
        return float(stats.pop())


def di(options: DeepInversionOptions | None = None, n: int = 64, seed: int = 0) -> DeepInversion:
    torch.manual_seed(seed)
    teacher = BNNet()
    ctx = make_context(teacher, random_images(n, seed=seed), batch_size=16)
    return DeepInversion(BNNet(width=3), ctx, options or DeepInversionOptions(
        iterations=3, bank_batches=3, refresh_batches=1, steps_per_epoch=2))


def test_bn_loss_is_zero_when_running_stats_equal_the_batch_stats():
    torch.manual_seed(0)
    net = BNNet()
    x = torch.randn(12, 1, 8, 8) * 2 + 0.5
    assert bn_loss(net, x) > 0.1  # default running stats (0, 1) do not match this batch
    set_running_stats_to(net, x)
    assert bn_loss(net, x) <= 1e-6


def test_bn_loss_matches_the_formula_on_every_layer():
    torch.manual_seed(0)
    net = BNNet().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 1, 8, 8)
    expected, h = 0.0, x
    for layer in net.body.requires_grad_(False):
        if isinstance(layer, nn.BatchNorm2d):
            mean = h.mean(dim=(0, 2, 3))
            var = ((h - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
            distance = ((mean - layer.running_mean) ** 2).sum().sqrt() + ((var - layer.running_var) ** 2).sum().sqrt()
            expected += float(distance)
        h = layer(h)
    assert bn_loss(net, x) == pytest.approx(expected, rel=1e-5)


def test_a_few_synthesis_steps_lower_the_bn_loss_from_noise():
    method = di(DeepInversionOptions(iterations=25, lr=0.1, jitter=1))
    # running statistics from structured "real" data, far from N(0, 1) noise
    real = method.ctx.normalize(random_images(64, seed=3) // 4 + 150)
    set_running_stats_to(method.teacher, real)
    torch.manual_seed(0)
    noise = torch.randn(16, 1, 8, 8)
    images, last = method.synthesize_batch(torch.arange(16) % 3, x=noise)
    assert bn_loss(method.teacher, images) < 0.5 * bn_loss(method.teacher, noise)
    assert set(last) >= {"ce", "bn", "tv", "l2", "total"}


def test_image_priors_formulas():
    x = torch.randn(2, 3, 5, 4)
    tv, l2 = image_priors(x)
    d = [x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :],
         x[..., 1:, :-1] - x[..., :-1, 1:], x[..., 1:, 1:] - x[..., :-1, :-1]]
    assert float(tv) == pytest.approx(sum(float((t ** 2).sum().sqrt()) for t in d), rel=1e-5)
    assert float(l2) == pytest.approx(float((x ** 2).sum().sqrt()), rel=1e-6)


def test_no_bn_teacher_raises_a_clear_error():
    ctx = make_context(PlainNet(), random_images(8))
    with pytest.raises(ValueError, match=r"DeepInversion needs a teacher with BatchNorm layers; PlainNet has none"):
        DeepInversion(BNNet(width=3), ctx, DeepInversionOptions())


def test_synthesis_keeps_images_in_pixel_range_and_leaves_no_hooks():
    method = di()
    images, _ = method.synthesize(1)
    assert images.dtype == torch.uint8 and images.shape == (16, 1, 8, 8)
    for m in method.teacher.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_bank_is_filled_then_partially_refreshed():
    method = di()
    plan = method.begin_epoch(0)
    assert plan.indices is None and plan.steps == 2
    bank0 = method.bank.clone()
    assert bank0.shape == (3 * 16, 1, 8, 8)
    method.begin_epoch(1)
    changed = (method.bank != bank0).flatten(1).any(dim=1).view(3, 16).all(dim=1)
    assert changed.tolist() == [True, False, False]  # the oldest batch only
    method.begin_epoch(1)  # same epoch again: no second refresh
    assert (method.bank != bank0).flatten(1).any(dim=1).view(3, 16).all(dim=1).tolist() == [True, False, False]
    bank1 = method.bank.clone()
    method.begin_epoch(2)
    changed = (method.bank != bank1).flatten(1).any(dim=1).view(3, 16).all(dim=1)
    assert changed.tolist() == [False, True, False]
    metrics = method.epoch_metrics()
    assert metrics["di_synth_batches"] == 1 and metrics["di_bank_size"] == 48


def test_student_is_distilled_on_bank_images_with_teacher_logits():
    method = di(DeepInversionOptions(iterations=2, bank_batches=2, refresh_batches=0, temperature=3.0))
    method.begin_epoch(0)
    method.eval()
    torch.manual_seed(4)
    losses = method.training_step(None)
    torch.manual_seed(4)
    indices = torch.randperm(len(method.bank))[:16]
    x = method.ctx.normalize(method.ctx.augment(method.bank[indices]))
    with torch.no_grad():
        z_t = method.teacher(x)
    z_s = method.student(x)
    expected = F.kl_div(F.log_softmax(z_s / 3, 1), F.log_softmax(z_t / 3, 1), reduction="batchmean",
                        log_target=True) * 9
    assert set(losses) == {"kd"}
    assert torch.allclose(losses["kd"], expected, atol=1e-5)


def test_method_state_round_trip_restores_the_bank():
    method = di()
    method.begin_epoch(0)
    buffer = io.BytesIO()
    torch.save(method.method_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = DeepInversion(BNNet(width=3), method.ctx, method.options)
    other.load_method_state(state)
    assert torch.equal(other.bank, method.bank)
    torch.manual_seed(2)
    method.begin_epoch(1)
    torch.manual_seed(2)
    other.begin_epoch(1)
    assert torch.equal(other.bank, method.bank)


def test_deepinversion_is_registered():
    assert get_method("deepinversion") is DeepInversion


def test_teacher_untouched_by_synthesis():
    method = di()
    before = snapshot(method.teacher)
    train_epochs(method, epochs=2)
    assert_same_tensors(snapshot(method.teacher), before)
    assert all(p.grad is None for p in method.teacher.parameters())
