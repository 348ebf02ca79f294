"""The fitted score ``bn_grid_maha``: seeded class-conditional Mahalanobis on the BN inputs' 2×2-grid channel
means. Hand-made TeacherOutputs where the answer is known, the teacher pass that records the features,
determinism, and the registry plumbing."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kd3.data.augment import Normalizer
from kd3.models.base import Net
from kd3.scores import BASE_SCORES, FITTED_SCORES, TeacherOutputs, available_scores, compute_score, resolve, teacher_outputs
from kd3.scores import outputs as outputs_module
from kd3.scores.cache import SCORES_VERSION
from kd3.scores.fitted import SEED_SCORE, seed_indices, seeded_mahalanobis

IDENTITY = Normalizer((0.0,), (1.0,))


def hand_made(grid: torch.Tensor, prediction: torch.Tensor, num_classes: int = 2) -> TeacherOutputs:
    """Outputs whose logits predict ``prediction``; only bn_grid and the argmax matter to the fitted score."""
    n = len(grid)
    logits = F.one_hot(prediction, num_classes).float() * 5.0
    return TeacherOutputs(logits=logits, feature_l2=torch.ones(n), feature_l1=torch.ones(n),
                          bn_distances={v: torch.zeros(n, 1) for v in ("mean", "kl", "meanlogvar")},
                          bn_layers=["bn"], bn_grid=grid.half())


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    diff = score[positive][:, None] - score[~positive][None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


# -- the fit, on two well-separated clusters ----------------------------------------------------------
def test_positives_cluster_outranks_junk_although_the_seed_misranks_most_of_it():
    g = torch.Generator().manual_seed(0)
    relevant = torch.randn(100, 4, generator=g) * 0.3  # tight cluster at the origin
    junk = torch.randn(300, 4, generator=g) * 2.0 + torch.tensor([6.0, -6.0, 6.0, -6.0])
    grid = torch.cat([relevant, junk])
    positive = torch.arange(400) < 100
    # The seed is right only at the very top: 20 relevant images first, then junk, then the other 80.
    seed = torch.cat([torch.linspace(10, 9, 20), torch.linspace(0, -1, 80), torch.linspace(5, 1, 300)])
    assert auroc(seed, positive) < 0.3
    score = seeded_mahalanobis(hand_made(grid, torch.zeros(400, dtype=torch.long)), seed, keep=0.05)
    assert auroc(score, positive) == 1.0


def cigar(rotate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """400 relevant images with std 10 along one direction and 0.1 across it, then two probes: 1.5 σ along
    (far in Euclid, typical) and 20 σ across (close in Euclid, atypical); seed = the relevant ones."""
    g = torch.Generator().manual_seed(1)
    relevant = (torch.randn(400, 2, generator=g) * torch.tensor([10.0, 0.1])) @ rotate
    probes = torch.tensor([[15.0, 0.0], [0.0, 2.0]]) @ rotate
    return torch.cat([relevant, probes]), torch.cat([torch.ones(400), torch.zeros(2)])


def test_distance_uses_the_covariance_not_euclid():
    grid, seed = cigar(torch.eye(2))
    score = seeded_mahalanobis(hand_made(grid, torch.zeros(402, dtype=torch.long)), seed, keep=400 / 402)
    assert score[400] > score[401]
    assert score[401] < torch.quantile(score[:400], 0.01)  # the across-probe is below almost every relevant one


def test_shrinkage_interpolates_between_full_and_diagonal_covariance():
    # Along the diagonal, only the off-diagonal covariance tells the two probes apart.
    grid, seed = cigar(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]) / 2 ** 0.5)
    outputs = hand_made(grid, torch.zeros(402, dtype=torch.long))
    full = seeded_mahalanobis(outputs, seed, keep=400 / 402, shrink=0.0)
    diagonal = seeded_mahalanobis(outputs, seed, keep=400 / 402, shrink=1.0)
    assert full[400] > full[401] and diagonal[400] < diagonal[401]
    # λ = 0.1 floors the across-variance at about 0.1 · 50 = 5: the across-probe's distance is then ≈ 2² / 5.
    default = seeded_mahalanobis(outputs, seed, keep=400 / 402)
    assert -default[401].item() == pytest.approx(4 / 5.0, rel=0.2)


def test_one_gaussian_per_predicted_class():
    # Two relevant classes at ±5 along axis 0; junk sits at their midpoint, where one pooled Gaussian would
    # put its mean: class-conditional means must rank the junk below every relevant image.
    g = torch.Generator().manual_seed(2)
    a = torch.randn(150, 2, generator=g) * 0.5 + torch.tensor([-5.0, 0.0])
    b = torch.randn(150, 2, generator=g) * 0.5 + torch.tensor([5.0, 0.0])
    junk = torch.randn(50, 2, generator=g) * 0.5
    grid = torch.cat([a, b, junk])
    prediction = torch.cat([torch.zeros(150), torch.ones(150), torch.randint(0, 2, (50,), generator=g)]).long()
    seed = torch.cat([torch.rand(300, generator=g) + 1, torch.rand(50, generator=g)])  # seed: all relevant first
    score = seeded_mahalanobis(hand_made(grid, prediction), seed, keep=0.5)
    assert score[300:].max() < score[:300].min()
    single = seeded_mahalanobis(hand_made(grid, torch.zeros(350, dtype=torch.long)), seed, keep=0.5)
    assert single[300:].mean() > single[:300].mean()  # the pooled Gaussian gets it backwards


def test_seed_size_and_ties():
    seed = torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0] * 20)
    assert seed_indices(seed, keep=0.05, dim=1).tolist() == [1, 2, 6, 7, 11]  # ceil(5 % of 100), ties by index
    assert len(seed_indices(seed, keep=0.05, dim=10)) == 20  # at least 2 · dim
    assert len(seed_indices(seed[:7], keep=0.05, dim=10)) == 7  # never more than N


def test_deterministic_float64_one_value_per_image_and_permutation_equivariant():
    g = torch.Generator().manual_seed(3)
    grid = torch.randn(300, 6, generator=g)
    prediction = torch.randint(0, 3, (300,), generator=g)
    seed = torch.randn(300, generator=g)
    outputs = hand_made(grid, prediction, num_classes=3)
    first, again = seeded_mahalanobis(outputs, seed), seeded_mahalanobis(outputs, seed)
    assert first.shape == (300,) and first.dtype == torch.float64 and torch.isfinite(first).all()
    assert torch.equal(first, again) and (first <= 0).all()
    order = torch.randperm(300, generator=g)
    permuted = seeded_mahalanobis(hand_made(grid[order], prediction[order], 3), seed[order])
    assert torch.allclose(permuted, first[order], rtol=1e-9, atol=1e-9)


def test_a_constant_feature_or_a_lone_class_does_not_break_the_fit():
    g = torch.Generator().manual_seed(4)
    grid = torch.cat([torch.randn(100, 3, generator=g), torch.full((100, 1), 2.0)], dim=1)  # last column constant
    prediction = torch.zeros(100, dtype=torch.long)
    prediction[0] = 1  # one image alone in class 1: no Gaussian for it
    score = seeded_mahalanobis(hand_made(grid, prediction), torch.randn(100, generator=g), keep=0.5)
    assert torch.isfinite(score).all()
    single = seeded_mahalanobis(hand_made(grid[:3], torch.arange(3) % 2), torch.tensor([3.0, 2.0, 1.0]), keep=0.3)
    assert torch.isfinite(single).all()  # no class has 2 seed images: one Gaussian on all of them


# -- the teacher pass records bn_grid -----------------------------------------------------------------
class TwoBNNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                                  nn.ReLU())
        self.classifier = nn.Linear(3, 4)
        self.feature_channels = 3

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map.mean(dim=(2, 3))


def small_pool(n: int = 10) -> tuple[TwoBNNet, torch.Tensor]:
    torch.manual_seed(0)
    net = TwoBNNet().eval()
    with torch.no_grad():
        for bn in (net.body[0], net.body[2]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.05, 0.5)
    return net, torch.randint(0, 256, (n, 2, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_teacher_pass_records_the_2x2_grid_means_of_every_bn_input():
    net, images = small_pool()
    outputs = teacher_outputs(net, images, IDENTITY, batch_size=4)  # three batches
    x = IDENTITY(images)
    with torch.no_grad():
        conv_out = net.body[1](net.body[0](x))
    # 6×6 maps: each cell is a 3×3 block; channel-major, layer by layer.
    expected = torch.cat([x.unfold(2, 3, 3).unfold(3, 3, 3).mean(dim=(4, 5)).flatten(1),
                          conv_out.unfold(2, 3, 3).unfold(3, 3, 3).mean(dim=(4, 5)).flatten(1)], dim=1)
    assert outputs.bn_grid.shape == (10, 2 * 4 + 3 * 4) and outputs.bn_grid.dtype == torch.float16
    assert torch.allclose(outputs.bn_grid.float(), expected, atol=2e-3, rtol=1e-3)
    assert outputs.bn_grid[0, :4].float().mean().item() == pytest.approx(x[0, 0].mean().item(), abs=2e-3)
    record = TeacherOutputs.from_record(outputs.to_record())
    assert torch.equal(record.bn_grid, outputs.bn_grid)
    assert SCORES_VERSION >= 2  # cached passes without bn_grid are recomputed


def test_wide_teachers_are_projected_to_a_fixed_width(monkeypatch):
    net, images = small_pool()
    full = teacher_outputs(net, images, IDENTITY).bn_grid.float()
    monkeypatch.setattr(outputs_module, "BN_GRID_MAX_DIM", 8)
    projected = teacher_outputs(net, images, IDENTITY).bn_grid.float()
    assert projected.shape == (10, 8)
    assert torch.allclose(projected, full @ outputs_module.projection(20, 8), atol=2e-2, rtol=1e-2)
    assert torch.equal(outputs_module.projection(20, 8), outputs_module.projection.__wrapped__(20, 8))


# -- the registry --------------------------------------------------------------------------------------
def test_registry_name_seed_and_combinations():
    net, images = small_pool(40)
    outputs = teacher_outputs(net, images, IDENTITY)
    assert resolve("bn_grid_maha") == "bn_grid_maha" and "bn_grid_maha" in FITTED_SCORES
    assert "bn_grid_maha" not in BASE_SCORES and "bn_grid_maha" not in available_scores(outputs)
    score = compute_score("bn_grid_maha", outputs)
    assert torch.equal(score, seeded_mahalanobis(outputs, compute_score(SEED_SCORE, outputs)))
    combined = compute_score("meanrank:bn_grid_maha+energy", outputs)
    assert combined.shape == (40,) and combined.min() > 0 and combined.max() <= 1
    # As the default it still seeds from the fixed SEED_SCORE (no recursion, same numbers).
    assert resolve("default") == "bn_grid_maha"
    assert torch.equal(compute_score("default", outputs), score)


def test_outputs_without_bn_grid_are_refused_with_a_reason():
    outputs = hand_made(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long))
    outputs.bn_grid = None
    with pytest.raises(ValueError, match="bn_grid"):
        compute_score("bn_grid_maha", outputs)
    assert compute_score("energy", outputs).shape == (5,)  # base scores do not need it
