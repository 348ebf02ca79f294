"""KD³'s pure parts: schedule, selection, projector, weighting, MixDistribution, NT-Xent."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd3.methods.kd3.contrastive import EmbeddingHead, nt_xent
from kd3.methods.kd3.mixdistribution import EPS, channel_stats, mix_distribution, sample_mix
from kd3.methods.kd3.projector import Projector, common_size
from kd3.methods.kd3.schedule import TeacherWeight
from kd3.methods.kd3.selection import blended_prediction, class_thresholds, percentile_select, select
from kd3.methods.kd3.weighting import get_weighting


# -- schedule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch, expected", [(1, 0.9924), (60, 0.8525), (100, 0.4933), (119, 0.2684),
                                             (120, 0.0), (121, 0.0), (239, 0.0)])
def test_teacher_weight_matches_released_curve_for_240_epochs(epoch, expected):
    a = TeacherWeight.for_run(240)
    assert (a.cutoff, a.horizon) == (120, 160)
    assert round(a(epoch), 4) == expected


def test_teacher_weight_scales_with_run_length():
    short, long = TeacherWeight.for_run(24), TeacherWeight.for_run(240)
    # e+1 at the same fraction of the horizon gives the same weight.
    assert short(9) == pytest.approx(long(99))
    assert short(11) > 0 and short(12) == 0.0


# -- selection -----------------------------------------------------------------------------------
def test_class_thresholds_follow_flexmatch_mapping():
    # σ = 10, 9, 5, 1 → β = 1, 0.9, 0.5, 0.1 → τ·β/(2−β) with τ = 0.95.
    thresholds = class_thresholds(torch.tensor([10, 9, 5, 1]), 0.95)
    assert [round(t, 4) for t in thresholds.tolist()] == [0.95, 0.7773, 0.3167, 0.05]
    assert class_thresholds(torch.tensor([4, 0]), 0.95).tolist()[1] == 0.0


def _rows(probabilities: list[tuple[int, float]], num_classes: int = 4) -> torch.Tensor:
    """Probability rows: p on the given class, the rest spread evenly over the other classes."""
    rows = torch.empty(len(probabilities), num_classes, dtype=torch.float64)
    for i, (k, p) in enumerate(probabilities):
        rows[i] = (1 - p) / (num_classes - 1)
        rows[i, k] = p
    return rows


# Worked by hand, 4 classes:
#   class 0: images 0 (0.97), 1 (0.90), 2 (0.96), 3 (0.50)  σ=4, β=1    τ=0.95          → 0, 2
#   class 1: images 4 (0.80), 5 (0.60), 6 (0.50)            σ=3, β=0.75 τ=0.95·.75/1.25=0.57 → 4, 5
#   class 2: images 7 (0.40), 8 (0.30)                      σ=2, β=0.5  τ=0.95·.5/1.5=0.3167 → 7
#   class 3: nobody                                         σ=0         τ=0
# selected = [0, 2, 4, 5, 7]; selected per class [2, 2, 1, 0].
HAND = [(0, 0.97), (0, 0.90), (0, 0.96), (0, 0.50), (1, 0.80), (1, 0.60), (1, 0.50), (2, 0.40), (2, 0.30)]


@pytest.mark.parametrize("teacher_weight", [0.5, 0.0, 1.0])
def test_selection_picks_hand_worked_indices(teacher_weight):
    log_q = _rows(HAND).log().float()
    garbage = torch.randn(len(HAND), 4, generator=torch.Generator().manual_seed(0)) * 10
    if teacher_weight == 0.5:  # softmax(0.5·2 log q + 0.5·0) = q
        teacher_logits, student_logits = 2 * log_q, torch.zeros_like(log_q)
    elif teacher_weight == 0.0:  # the teacher is ignored
        teacher_logits, student_logits = garbage, log_q
    else:  # the student is ignored
        teacher_logits, student_logits = log_q, garbage
    confidence, prediction = blended_prediction(teacher_logits, student_logits, teacher_weight)
    selection = select(confidence, prediction, 4, 0.95)
    assert selection.indices.tolist() == [0, 2, 4, 5, 7]
    assert selection.predicted_per_class.tolist() == [4, 3, 2, 0]
    assert selection.selected_per_class.tolist() == [2, 2, 1, 0]
    assert selection.thresholds.tolist() == pytest.approx([0.95, 0.57, 0.95 / 3, 0.0], abs=1e-6)
    assert not selection.empty


def test_blend_mixes_logits_before_softmax():
    teacher, student = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    confidence, prediction = blended_prediction(teacher, student, 0.25)
    mixed = torch.tensor([0.5, 3.0])  # 0.25·[2, 0] + 0.75·[0, 4]
    assert prediction.item() == 1
    assert confidence.item() == pytest.approx(torch.softmax(mixed, 0)[1].item())


def test_empty_selection_is_reported_not_raised():
    selection = select(torch.full((5,), 0.25), torch.zeros(5, dtype=torch.long), 4, 0.95)
    assert selection.empty and selection.indices.numel() == 0


# -- projector -----------------------------------------------------------------------------------
def test_projector_is_the_simkd_bottleneck_and_pools_a_larger_student_map():
    projector = Projector(6, 16, (8, 8), common_size((8, 8), (4, 4)))
    convs = [m for m in projector.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (6, 8, (1, 1), (0, 0)), (8, 8, (3, 3), (1, 1)), (8, 16, (1, 1), (0, 0))]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in projector.modules()) == 3
    out = projector(torch.randn(2, 6, 8, 8))
    assert out.shape == (2, 16, 4, 4) and (out >= 0).all()  # ends in ReLU
    assert common_size((4, 4), (7, 7)) == (4, 4)


# -- weighting -----------------------------------------------------------------------------------
def test_sigmoid_weights_lie_in_half_open_unit_and_grow_with_disagreement():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(64, 10, generator=generator), torch.randn(64, 10, generator=generator)
    weights = get_weighting("sigmoid")(student.requires_grad_(), teacher)
    assert ((weights > 0.5) & (weights < 1)).all() and not weights.requires_grad
    distance = (student - teacher).norm(dim=1)
    assert torch.equal(weights.argsort(), distance.argsort())
    assert get_weighting("sigmoid")(teacher, teacher).eq(0.5).all()
    assert get_weighting("uniform")(student, teacher).eq(1).all()
    with pytest.raises(ValueError, match="valid: sigmoid, uniform"):
        get_weighting("nope")


# -- MixDistribution -----------------------------------------------------------------------------
def test_mixdistribution_keeps_content_and_mixes_statistics():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5) * torch.rand(6, 3, 1, 1).add(0.5) + torch.randn(6, 3, 1, 1) * 3
    x.requires_grad_()
    params = sample_mix(6, alpha=0.1)
    assert params is not None and sorted(params.permutation.tolist()) == list(range(6))
    assert ((params.lam >= 0) & (params.lam <= 1)).all()
    mixed = mix_distribution(x, params)

    mean, std = channel_stats(x)
    lam = params.lam.view(-1, 1, 1, 1)
    mixed_mean = lam * mean + (1 - lam) * mean[params.permutation]
    mixed_std = lam * std + (1 - lam) * std[params.permutation]
    assert torch.allclose((mixed - mixed_mean) / mixed_std, (x - mean) / std, atol=1e-5)
    assert torch.allclose(mixed.mean(dim=(2, 3), keepdim=True), mixed_mean, atol=1e-5)
    mixed_sd = (mixed.var(dim=(2, 3), keepdim=True, unbiased=True) + EPS).sqrt()
    assert torch.allclose(mixed_sd, mixed_std, atol=1e-5)
    # μ and σ are detached: x̃ is an elementwise affine map of x with slope σ̃/σ.
    mixed.sum().backward()
    assert torch.allclose(x.grad, (mixed_std / std).expand_as(x), atol=1e-6)


def test_mixdistribution_probability_skips_batches():
    torch.manual_seed(0)
    assert sample_mix(4, 0.1, probability=1e-9) is None
    x = torch.randn(4, 2, 3, 3)
    assert mix_distribution(x, None) is x
    with pytest.raises(ValueError, match="at least 2 positions"):
        channel_stats(torch.randn(4, 2, 1, 1))


# -- NT-Xent -------------------------------------------------------------------------------------
def _nt_xent_loops(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    z = torch.cat([a, b]).tolist()
    n, batch, total = len(z), len(a), 0.0

    def sim(i: int, j: int) -> float:
        return sum(p * q for p, q in zip(z[i], z[j])) / temperature

    for i in range(n):
        positive = (i + batch) % n
        denominator = sum(math.exp(sim(i, k)) for k in range(n) if k != i)
        total += -math.log(math.exp(sim(i, positive)) / denominator)
    return total / n


def test_nt_xent_equals_double_loop():
    generator = torch.Generator().manual_seed(0)
    head = EmbeddingHead(5, 7).double()
    a = head(torch.randn(6, 5, generator=generator, dtype=torch.float64))
    b = head(torch.randn(6, 5, generator=generator, dtype=torch.float64))
    assert torch.allclose(a.norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert nt_xent(a, b, 0.3).item() == pytest.approx(_nt_xent_loops(a, b, 0.3), abs=1e-6)
    # Identical views with well-separated images give a small loss; shuffled positives a large one.
    assert nt_xent(a, a, 0.3) < nt_xent(a, a[torch.tensor([1, 2, 3, 4, 5, 0])], 0.3)


# -- percentile thresholds (relevance scores) ----------------------------------------------------
def test_percentile_selection_picks_hand_worked_indices():
    confidence = torch.tensor([p for _, p in HAND])
    prediction = torch.tensor([k for k, _ in HAND])
    # Budget floor(0.5 · 9) = 4, share floor(4 / 4) = 1 per class: each class keeps its best image.
    selection = percentile_select(confidence, prediction, 4, 0.5)
    assert selection.indices.tolist() == [0, 4, 7]
    assert selection.selected_per_class.tolist() == [1, 1, 1, 0]
    assert selection.thresholds[:3].tolist() == pytest.approx([0.97, 0.80, 0.40])
    assert math.isnan(selection.thresholds[3].item())
    # Budget 9, share 2: class 0 keeps 0 (0.97) and 2 (0.96), class 1 keeps 4 and 5, class 2 both of its own.
    assert percentile_select(confidence, prediction, 4, 1.0).indices.tolist() == [0, 2, 4, 5, 7, 8]


@pytest.mark.parametrize("seed", range(40))
def test_percentile_thresholds_never_keep_more_than_the_budget(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 300, (1,), generator=g))
    num_classes = int(torch.randint(1, 7, (1,), generator=g))
    skew = torch.rand(num_classes, generator=g) ** 4 + 1e-3  # some classes huge, some nearly empty
    prediction = torch.multinomial(skew, n, replacement=True, generator=g) if n else torch.zeros(0, dtype=torch.long)
    score = (torch.rand(n, generator=g) * 5).round()  # many ties
    keep_fraction = float(torch.rand(1, generator=g).clamp(min=0.01))
    selection = percentile_select(score, prediction, num_classes, keep_fraction)
    budget = math.floor(keep_fraction * n)
    assert len(selection.indices) <= budget
    share = budget // num_classes
    assert selection.selected_per_class.tolist() == selection.predicted_per_class.clamp(max=share).tolist()
    assert len(set(selection.indices.tolist())) == len(selection.indices)
    assert (selection.selected_per_class <= selection.predicted_per_class).all()
    kept = torch.zeros(n, dtype=torch.bool)
    kept[selection.indices] = True
    for k in range(num_classes):  # within a class, every kept score beats every rejected one
        members = prediction == k
        if (kept & members).any() and (~kept & members).any():
            assert score[kept & members].min() >= score[~kept & members].max()


@pytest.mark.parametrize("junk", [700, 7000])
def test_a_class_absorbing_junk_keeps_only_its_share_and_sets_no_other_threshold(junk):
    # ``junk`` confident junk images all predicted as class 0, then 100 images of each of classes 1-3.
    g = torch.Generator().manual_seed(0)
    prediction = torch.cat([torch.zeros(junk, dtype=torch.long), torch.arange(1, 4).repeat_interleave(100)])
    confidence = torch.cat([0.9 + 0.1 * torch.rand(junk, generator=g), 0.3 + 0.6 * torch.rand(300, generator=g)])
    released = select(confidence, prediction, 4, 0.95)
    # FlexMatch: β = 100/junk for classes 1-3, τ = 0.95·β/(2 − β) → 0 as the junk grows: they keep everything.
    beta = 100 / junk
    assert released.thresholds[1].item() == pytest.approx(0.95 * beta / (2 - beta))
    assert released.selected_per_class[1:].tolist() == [100, 100, 100]
    # Budget 0.1 · N, share N/40 per class: the junk class keeps only its share; classes 1-3 keep their
    # own top 25 (N = 1000) or all 100 (N = 7300, share 182), whatever the junk's scores.
    percentile = percentile_select(confidence, prediction, 4, 0.1)
    share = math.floor(0.1 * len(prediction)) // 4
    assert percentile.selected_per_class.tolist() == [share] + [min(100, share)] * 3
    for k in (1, 2, 3):
        own = confidence[prediction == k].sort(descending=True).values
        assert percentile.thresholds[k].item() == pytest.approx(own[min(100, share) - 1].item())
    other_junk = confidence.clone()
    other_junk[:junk] = torch.rand(junk, generator=g)  # the junk's scores never reach another class
    assert torch.equal(percentile_select(other_junk, prediction, 4, 0.1).thresholds[1:], percentile.thresholds[1:])
