import io
import math

import pytest
import torch

from baseline_nets import BNNet, assert_same_tensors, make_context, random_images, snapshot, train_epochs
from kd3.methods.base import get_method
from kd3.methods.dafl import DAFL, DAFLOptions, dafl_generator_losses
from kd3.methods.generators import DAFLGenerator
from kd3.methods.losses import kd_loss


def dafl(options: DAFLOptions | None = None, seed: int = 0, n: int = 64) -> DAFL:
    torch.manual_seed(seed)
    ctx = make_context(BNNet(), random_images(n), batch_size=16)
    return DAFL(BNNet(width=3), ctx, options or DAFLOptions(latent_dim=8, generator_width=16, generator_lr=0.01))


def test_generator_losses_equal_their_formulas():
    torch.manual_seed(0)
    logits = torch.randn(6, 4) * 3
    features = torch.randn(6, 5)
    losses = dafl_generator_losses(logits, features)
    # by hand
    probs = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    labels = logits.max(dim=1).indices
    one_hot = -torch.log(probs[torch.arange(6), labels]).mean()
    activation = -(features.abs().sum() / features.numel())
    mean_p = probs.sum(dim=0) / 6
    entropy10 = sum(float(p) * math.log10(float(p)) for p in mean_p)
    assert float(losses["one_hot"]) == pytest.approx(float(one_hot), abs=1e-6)
    assert float(losses["activation"]) == pytest.approx(float(activation), abs=1e-6)
    assert float(losses["entropy"]) == pytest.approx(entropy10, abs=1e-6)
    natural = dafl_generator_losses(logits, features, entropy_log10=False)["entropy"]
    assert float(natural) == pytest.approx(entropy10 * math.log(10), abs=1e-5)


def test_method_generator_losses_use_teacher_logits_and_pooled_features():
    method = dafl()
    method.train()
    z = torch.randn(10, 8)
    images, logits, losses = method.generator_losses(z)
    assert images.shape == (10, 1, 8, 8)
    teacher = method.teacher
    with torch.no_grad():
        pooled = teacher.pool(teacher.features(images))
        expected = dafl_generator_losses(teacher.classifier(pooled), pooled)
    assert torch.allclose(logits, teacher(images), atol=1e-6)
    for key in ("one_hot", "activation", "entropy"):
        assert torch.allclose(losses[key], expected[key], atol=1e-6)
    total = expected["one_hot"] + 0.1 * expected["activation"] + 5.0 * expected["entropy"]
    assert torch.allclose(losses["total"], total, atol=1e-6)


def test_a_few_generator_steps_lower_the_total():
    method = dafl()
    method.train()
    z = torch.randn(32, 8)
    totals = []
    for _ in range(15):
        totals.append(float(method.generator_step(z)[2]["total"].detach()))  # L_G before each step
    assert float(method.generator_losses(z)[2]["total"].detach()) < totals[0] - 0.01
    assert totals[-1] < totals[0]


def test_generator_is_not_in_trainable_parameters_and_only_the_student_loss_is_returned():
    method = dafl()
    trainable = {id(p) for p in method.trainable_parameters()}
    assert not trainable & {id(p) for p in method.generator.parameters()}
    assert {id(p) for p in method.student.parameters()} <= trainable
    plan = method.begin_epoch(0)
    assert plan.indices is None and plan.steps == 64 // 16
    method.train()
    torch.manual_seed(1)
    losses = method.training_step(None)
    assert set(losses) == {"kd"}
    # the returned loss reaches the student only: the generator gets nothing from it
    method.generator.zero_grad(set_to_none=True)
    losses["kd"].backward()
    assert all(p.grad is None for p in method.generator.parameters())
    metrics = method.epoch_metrics()
    assert {"dafl_gen_one_hot", "dafl_gen_activation", "dafl_gen_entropy", "dafl_gen_total"} <= set(metrics)


def test_training_step_distils_the_student_on_the_generated_batch():
    method = dafl(DAFLOptions(latent_dim=8, generator_width=16, generator_lr=0.0, temperature=2.0))
    method.train()
    gen_state = snapshot(method.generator)
    torch.manual_seed(5)
    losses = method.training_step(None)
    # replay: same z, generator unchanged (lr 0), BN stats restored
    method.generator.load_state_dict(gen_state)
    torch.manual_seed(5)
    z = torch.randn(16, 8)
    images = method.generator(z)
    with torch.no_grad():
        expected = kd_loss(method.student(images), method.teacher(images), 2.0)
    assert torch.allclose(losses["kd"], expected, atol=1e-5)


def test_generator_handles_sizes_channels_and_pixel_output():
    from kd3.data.augment import Normalizer

    norm = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    gen = DAFLGenerator((3, 30, 26), latent_dim=5, width=8, output="pixels", normalize=norm)
    with torch.no_grad():
        out = gen(torch.randn(4, 5))
    assert out.shape == (4, 3, 30, 26)
    low, high = (0 - norm.mean) / norm.std, (1 - norm.mean) / norm.std
    assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    bn = DAFLGenerator((1, 28, 28), latent_dim=5, width=8)
    with torch.no_grad():
        images = bn.train()(torch.randn(16, 5))
    assert images.shape == (16, 1, 28, 28)
    assert abs(float(images.mean())) < 1e-4 and float(images.var(unbiased=False)) == pytest.approx(1.0, abs=1e-2)


def test_state_round_trip_restores_generator_and_its_optimizer_exactly():
    method = dafl(seed=0)
    train_epochs(method, epochs=1, max_steps=3)
    buffer = io.BytesIO()
    torch.save({"method": method.state_dict(), "method_state": method.method_state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what checkpoint.load does

    torch.manual_seed(1)  # a differently initialised method around the same teacher
    other = DAFL(BNNet(width=3), method.ctx, method.options)
    assert not torch.equal(other.generator.l1.weight, method.generator.l1.weight)
    other.load_state_dict(state["method"])
    other.load_method_state(state["method_state"])
    assert_same_tensors(snapshot(other.generator), snapshot(method.generator))
    a, b = method.generator_optimizer.state_dict(), other.generator_optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(method.generator.parameters()))
    for key in a["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][key][name], b["state"][key][name]), (key, name)
    # and training continues identically
    for m in (method, other):
        m.train()
        torch.manual_seed(9)
        m.training_step(None)
    assert_same_tensors(snapshot(other.generator), snapshot(method.generator))


def test_dafl_is_registered():
    assert get_method("dafl") is DAFL
    with pytest.raises(ValueError, match="output"):
        DAFLGenerator((1, 8, 8), output="sigmoid")
