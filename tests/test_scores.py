"""Relevance scores: each equals its formula on hand-built tensors, the hooks read the right
tensors, rank combinations order a worked example, and the cache follows the teacher."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd3.data.augment import Normalizer
from kd3.data.pool import Pool
from kd3.models.base import Net
from kd3.scores import DEFAULT_SCORE, available_scores, cached_teacher_outputs, compute_score, resolve, teacher_outputs
from kd3.scores import cache as score_cache
from kd3.scores.formulas import bn_distance, energy, gradnorm, layer_set, max_logit, max_softmax
from kd3.scores.ranks import mean_rank, min_rank, percentile_ranks

IDENTITY = Normalizer((0.0,), (1.0,))  # x / 255: the normalised image is easy to rebuild in a test



class InputBNNet(Net):
    """BatchNorm on the input itself, then conv-BN-ReLU, GAP, fc-ReLU (the penultimate h), linear."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                  nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
        self.classifier = nn.Linear(5, num_classes)
        self.feature_channels = 4

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(feature_map.mean(dim=(2, 3)))


def random_net(seed: int = 0) -> InputBNNet:
    torch.manual_seed(seed)
    net = InputBNNet()
    with torch.no_grad():  # running statistics that are not the defaults, so every term matters
        for bn in (net.body[0], net.body[2]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.05, 0.5)
    return net.eval()


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 2, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- formulas on hand-built tensors ----------------------------------------------------------------
def test_output_scores_equal_their_formulas():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]])
    assert max_softmax(logits).tolist() == pytest.approx([0.75, math.exp(2) / (math.exp(2) + math.exp(-1))])
    assert energy(logits).tolist() == pytest.approx([math.log(4.0), math.log(math.exp(2) + math.exp(-1))])
    assert torch.allclose(energy(logits), torch.logsumexp(logits, dim=1))
    assert max_logit(logits).tolist() == pytest.approx([math.log(3.0), 2.0])


def test_bn_distances_on_hand_values():
    mean, var = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    running_mean, running_var = torch.tensor([0.0]), torch.tensor([4.0])
    assert bn_distance(mean, var, running_mean, running_var, 0.0, "mean").item() == pytest.approx(0.25)
    assert bn_distance(mean, var, running_mean, running_var, 0.0, "meanlogvar").item() == \
        pytest.approx(0.25 + math.log(0.5) ** 2)
    expected_kl = torch.distributions.kl_divergence(torch.distributions.Normal(1.0, math.sqrt(2.0)),
                                                    torch.distributions.Normal(0.0, 2.0))
    assert bn_distance(mean, var, running_mean, running_var, 0.0, "kl").item() == pytest.approx(expected_kl.item())


@pytest.mark.parametrize("variant", ["mean", "kl", "meanlogvar"])
def test_bn_distance_is_zero_for_running_statistics_and_averages_channels(variant):
    running_mean, running_var = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0])
    same = bn_distance(running_mean[None], running_var[None], running_mean, running_var, 1e-5, variant)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    one_off = bn_distance(torch.tensor([[0.3, 0.0]]), running_var[None], running_mean, running_var, 1e-5, variant)
    per_channel = bn_distance(torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.tensor([-1.0]),
                              torch.tensor([2.0]), 1e-5, variant)
    assert one_off.item() == pytest.approx(per_channel.item() / 2)  # channel 0 adds 0, the mean halves channel 1


def test_gradnorm_closed_form_equals_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(7, 4)
    h = torch.relu(torch.randn(5, 7))
    for i in range(5):
        layer.zero_grad()
        log_p = torch.log_softmax(layer(h[i:i + 1]), dim=1)
        uniform = torch.full_like(log_p, 1 / 4)
        nn.functional.kl_div(log_p, uniform, reduction="sum").backward()  # KL(u ‖ softmax(z))
        expected = layer.weight.grad.abs().sum()
        closed = gradnorm(layer(h[i:i + 1]).detach(), h[i:i + 1].abs().sum(dim=1))
        assert closed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_layer_sets_split_the_batchnorm_layers_in_run_order():
    assert [layer_set(1, s) for s in ("early", "late", "all")] == [[0], [0], [0]]
    assert [layer_set(2, s) for s in ("early", "late", "all")] == [[0], [1], [0, 1]]
    assert [layer_set(3, s) for s in ("early", "late", "all")] == [[0], [1, 2], [0, 1, 2]]
    assert [layer_set(4, s) for s in ("early", "late", "all")] == [[0, 1], [2, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        layer_set(0, "late")


# -- the one pass with hooks -----------------------------------------------------------------------
def test_teacher_pass_reads_the_classifier_input_and_batchnorm_inputs():
    net, pool_images = random_net(), images()
    outputs = teacher_outputs(net, pool_images, IDENTITY, batch_size=4)  # two batches
    x = IDENTITY(pool_images)
    with torch.no_grad():
        h = net.pool(net.features(x))
        logits = net.classifier(h)
        conv_out = net.body[1](net.body[0](x))
    assert torch.allclose(outputs.logits, logits, atol=1e-6)
    assert torch.allclose(compute_score("feature_norm", outputs), h.norm(dim=1), atol=1e-6)
    assert torch.allclose(compute_score("energy", outputs), torch.logsumexp(logits, dim=1), atol=1e-6)
    assert outputs.bn_layers == ["body.0", "body.2"]
    for column, (bn_input, bn) in enumerate([(x, net.body[0]), (conv_out, net.body[2])]):
        mean, var = bn_input.mean(dim=(2, 3)), bn_input.var(dim=(2, 3), unbiased=False)
        expected = bn_distance(mean, var, bn.running_mean, bn.running_var, bn.eps, "meanlogvar")
        assert torch.allclose(outputs.bn_distances["meanlogvar"][:, column], expected, atol=1e-5)
    early, late = (-outputs.bn_distances["kl"][:, i] for i in (0, 1))
    assert torch.allclose(compute_score("bn_kl_early", outputs), early)
    assert torch.allclose(compute_score("bn_kl_late", outputs), late)
    assert torch.allclose(compute_score("bn_kl_all", outputs), (early + late) / 2)


def test_gradnorm_from_the_pass_equals_autograd_on_the_teacher():
    net, pool_images = random_net(), images(3)
    outputs = teacher_outputs(net, pool_images, IDENTITY)
    for i in range(3):
        net.zero_grad()
        log_p = torch.log_softmax(net(IDENTITY(pool_images[i:i + 1])), dim=1)
        (-log_p.mean()).backward()  # cross-entropy against uniform targets = KL(u ‖ p) + log K
        assert compute_score("gradnorm", outputs)[i].item() == \
            pytest.approx(net.classifier.weight.grad.abs().sum().item(), rel=1e-5)


def test_bn_score_is_zero_for_an_image_whose_statistics_equal_the_running_ones():
    net = random_net()
    # Image 0: channel c alternates m_c ± a_c (checkerboard), so its mean is m_c and its biased variance a_c².
    levels = torch.tensor([[100.0, 60.0], [180.0, 30.0]])  # (m, a) per channel, in pixel units
    checker = (torch.arange(6)[:, None] + torch.arange(6)[None]) % 2 * 2 - 1
    image = torch.stack([m + a * checker for m, a in levels]).round().to(torch.uint8)
    other = images(1, seed=3)
    bn = net.body[0]
    with torch.no_grad():
        bn.running_mean.copy_(levels[:, 0] / 255)
        bn.running_var.copy_((levels[:, 1] / 255) ** 2)
    outputs = teacher_outputs(net, torch.cat([image[None], other]), IDENTITY)
    for variant in ("mean", "kl", "meanlogvar"):
        early = compute_score(f"bn_{variant}_early", outputs)
        assert early[0].item() == pytest.approx(0.0, abs=1e-5)  # higher = more relevant: 0 is the best possible
        assert early[1].item() < -1e-3


def test_teacher_pass_leaves_the_network_as_it_was():
    net = random_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    teacher_outputs(net, images(), IDENTITY)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_pre_hooks for m in net.modules())


# -- ranks and names -------------------------------------------------------------------------------
def test_percentile_ranks_share_ties():
    assert percentile_ranks(torch.tensor([5.0, 1.0, 5.0, 3.0])).tolist() == pytest.approx([0.875, 0.25, 0.875, 0.5])


def test_min_rank_orders_a_worked_example():
    # Image 0 is the best on score a but the worst on score b; image 3 is good on both.
    a = torch.tensor([0.9, 0.1, 0.5, 0.7])  # percentile ranks 1.00, 0.25, 0.50, 0.75
    b = torch.tensor([0.2, 0.8, 0.6, 0.9])  # percentile ranks 0.25, 0.75, 0.50, 1.00
    assert min_rank([a, b]).tolist() == pytest.approx([0.25, 0.25, 0.5, 0.75])
    assert mean_rank([a, b]).tolist() == pytest.approx([0.625, 0.5, 0.5, 0.875])
    # Mean-rank still ranks image 0 second; min-rank sends it to the bottom with image 1.
    assert torch.argsort(mean_rank([a, b]), descending=True, stable=True).tolist() == [3, 0, 1, 2]
    assert torch.argsort(min_rank([a, b]), descending=True, stable=True).tolist() == [3, 2, 0, 1]


def test_registry_names():
    assert resolve("default") == DEFAULT_SCORE
    assert resolve("minrank:feature_norm+bn_meanlogvar_late") == "minrank:feature_norm+bn_meanlogvar_late"
    for bad in ("softmax", "minrank:energy", "minrank:energy+energy", "maxrank:energy+gradnorm",
                "meanrank:energy+nope", "blended"):
        with pytest.raises(ValueError, match="unknown relevance score"):
            resolve(bad)
    outputs = teacher_outputs(random_net(), images(), IDENTITY)
    assert len(available_scores(outputs)) == 14
    combined = compute_score("minrank:energy+bn_mean_late", outputs)
    assert torch.equal(combined, min_rank([compute_score("energy", outputs), compute_score("bn_mean_late", outputs)]))


# -- the cache -------------------------------------------------------------------------------------
def test_cache_is_keyed_by_pool_and_teacher(tmp_path, monkeypatch):
    passes = []

    def counting(*args, **kwargs):
        passes.append(1)
        return teacher_outputs(*args, **kwargs)

    monkeypatch.setattr(score_cache, "teacher_outputs", counting)
    pool = Pool.unlabelled(images(8), "test")
    first = cached_teacher_outputs(pool, random_net(0), IDENTITY, tmp_path)
    again = cached_teacher_outputs(pool, random_net(0), IDENTITY, tmp_path)  # same weights: read from disk
    assert len(passes) == 1 and torch.equal(first.logits, again.logits)
    other_teacher = cached_teacher_outputs(pool, random_net(1), IDENTITY, tmp_path)
    assert len(passes) == 2 and not torch.allclose(first.logits, other_teacher.logits)
    retrained = random_net(0)
    with torch.no_grad():  # same architecture and init, one weight changed: a different teacher
        retrained.body[2].running_var.mul_(2)
    cached_teacher_outputs(pool, retrained, IDENTITY, tmp_path)
    assert len(passes) == 3
    cached_teacher_outputs(Pool.unlabelled(images(8, seed=1), "test"), random_net(0), IDENTITY, tmp_path)
    assert len(passes) == 4
    assert len(list((tmp_path / "scores").glob("*.pt"))) == 4
