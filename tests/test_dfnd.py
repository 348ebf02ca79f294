import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baseline_nets import BNNet, IntensityTeacher, assert_same_tensors, make_context, random_images, snapshot, train_epochs
from kd3.data.augment import Normalizer
from kd3.methods.base import Batch, get_method
from kd3.methods.dfnd import DFND, DFNDOptions, NoiseAdaptation
from kd3.methods.losses import kd_loss
from kd3.models.base import Net


def bright_pool(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant images of distinct intensities, in random order; returns (images, intensities)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.linspace(4, 250, n).round().to(torch.uint8)[torch.randperm(n, generator=g)]
    return values.view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous(), values


def intensity_context(n: int = 40):
    images, values = bright_pool(n)
    # mean 0 / std 1: normalised intensities are non-negative, so confidence grows with brightness
    ctx = make_context(IntensityTeacher(), images, normalize=Normalizer((0.0,), (1.0,)))
    return ctx, values


@pytest.mark.parametrize("score", ["cross_entropy", "max_softmax"])
def test_dfnd_keeps_exactly_the_top_n_most_confident(score):
    ctx, values = intensity_context()
    method = DFND(BNNet(), ctx, DFNDOptions(keep=7, score=score))
    plan = method.begin_epoch(0)
    logits = ctx.teacher(ctx.normalize(ctx.images))
    ce = F.cross_entropy(logits, logits.argmax(dim=1), reduction="none")
    expected = set(torch.argsort(ce)[:7].tolist())
    assert set(plan.indices.tolist()) == expected
    assert expected == set(torch.argsort(values.float(), descending=True)[:7].tolist())  # the 7 brightest
    assert len(plan.indices) == 7 and len(set(plan.indices.tolist())) == 7


def test_dfnd_keep_fraction_and_fixed_selection():
    ctx, values = intensity_context(40)
    method = DFND(BNNet(), ctx, DFNDOptions(keep_fraction=0.25))
    first = method.begin_epoch(0).indices
    assert len(first) == 10
    assert set(first.tolist()) == set(torch.argsort(values.float(), descending=True)[:10].tolist())
    method.training_step(Batch(indices=first[:4], images=ctx.images[first[:4]]))
    assert torch.equal(method.begin_epoch(1).indices, first)  # fixed for the whole run


def test_dfnd_diagonal_is_estimated_from_teacher_confidence_on_the_kept_set():
    ctx, _ = intensity_context(40)
    method = DFND(BNNet(), ctx, DFNDOptions(keep=12))
    kept = method.begin_epoch(0).indices
    with torch.no_grad():
        probs = F.softmax(ctx.teacher(ctx.normalize(ctx.images[kept])), dim=1)
    assert float(method.noise.diagonal) == pytest.approx(float(probs.max(dim=1).values.mean()), abs=1e-6)


def test_dfnd_diagonal_prefers_option_then_recorded_validation_accuracy():
    ctx, _ = intensity_context(40)
    ctx.teacher_accuracy = 0.83
    from_record = DFND(BNNet(), ctx, DFNDOptions(keep=12))
    from_record.begin_epoch(0)
    assert float(from_record.noise.diagonal) == pytest.approx(0.83)
    from_option = DFND(BNNet(), ctx, DFNDOptions(keep=12, teacher_accuracy=0.7))
    from_option.begin_epoch(0)
    assert float(from_option.noise.diagonal) == pytest.approx(0.7)


def test_dfnd_diagonal_from_the_kept_images_ignores_the_recorded_validation_accuracy():
    ctx, _ = intensity_context(40)
    ctx.teacher_accuracy = 0.83
    method = DFND(BNNet(), ctx, DFNDOptions(keep=12, accuracy_from="kept"))
    kept = method.begin_epoch(0).indices
    with torch.no_grad():
        probs = F.softmax(ctx.teacher(ctx.normalize(ctx.images[kept])), dim=1)
    confidence = float(probs.max(dim=1).values.mean())
    assert confidence != pytest.approx(0.83, abs=1e-3)
    assert float(method.noise.diagonal) == pytest.approx(confidence, abs=1e-6)
    with pytest.raises(ValueError, match="accuracy_from='val'"):
        DFND(BNNet(), ctx, DFNDOptions(keep=12, accuracy_from="val"))


def test_noise_matrix_rows_are_distributions_and_diagonal_survives_optimizer_steps():
    noise = NoiseAdaptation(4, diagonal=0.7)
    optimizer = torch.optim.SGD(noise.parameters(), lr=5.0, momentum=0.9, weight_decay=5e-4)
    before = noise.logits.detach().clone()
    for _ in range(3):
        p = F.softmax(torch.randn(8, 4), dim=1)
        loss = F.nll_loss(torch.log(noise(p)), torch.randint(0, 4, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(noise.logits.detach(), before)  # the off-diagonals did learn
    q = noise.matrix()
    assert torch.allclose(q.diagonal(), torch.full((4,), 0.7), atol=1e-7)
    assert torch.allclose(q.sum(dim=1), torch.ones(4), atol=1e-6)
    assert (q >= 0).all()


def test_dfnd_q_is_trainable_and_diagonal_holds_after_a_training_step(tmp_path):
    ctx, _ = intensity_context(40)
    method = DFND(BNNet(), ctx, DFNDOptions(keep=20, teacher_accuracy=0.8, teacher_views=2))
    assert any(p is method.noise.logits for p in method.trainable_parameters())
    before = method.noise.logits.detach().clone()
    train_epochs(method, epochs=1, lr=0.5)
    assert not torch.equal(method.noise.logits.detach(), before)
    assert torch.allclose(method.noise.matrix().diagonal(), torch.full((3,), 0.8), atol=1e-7)


def test_dfnd_losses_match_their_formulas():
    ctx, _ = intensity_context(40)
    method = DFND(BNNet(), ctx, DFNDOptions(keep=20, teacher_accuracy=0.9, teacher_views=0, noise_weight=0.5))
    kept = method.begin_epoch(0).indices
    with torch.no_grad():
        method.noise.logits.normal_()
    batch = Batch(indices=kept[:8], images=ctx.images[kept[:8]])
    method.eval()
    torch.manual_seed(3)
    losses = method.training_step(batch)
    torch.manual_seed(3)
    x = ctx.normalize(ctx.augment(batch.images))
    z_s, z_t = method.student(x), ctx.teacher(x)
    q = method.noise.matrix()
    noisy = F.softmax(z_s, dim=1) @ q
    assert torch.allclose(losses["kd"], kd_loss(z_s, z_t, 4.0), atol=1e-6)
    assert torch.allclose(losses["noise"], 0.5 * F.nll_loss(noisy.log(), z_t.argmax(dim=1)), atol=1e-6)


def test_dfnd_method_state_round_trip_keeps_the_selection():
    ctx, _ = intensity_context(40)
    method = DFND(BNNet(), ctx, DFNDOptions(keep=9))
    kept = method.begin_epoch(0).indices
    buffer = io.BytesIO()
    torch.save({"method": method.state_dict(), "method_state": method.method_state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    other = DFND(BNNet(), ctx, DFNDOptions(keep=9))
    other.load_state_dict(state["method"])
    other.load_method_state(state["method_state"])
    ctx.teacher.classifier.weight.data.mul_(-1)  # a re-scoring would now pick the darkest images
    try:
        assert torch.equal(other.begin_epoch(1).indices, kept)
    finally:
        ctx.teacher.classifier.weight.data.mul_(-1)
    assert float(other.noise.diagonal) == float(method.noise.diagonal)
    assert_same_tensors(snapshot(other.noise), snapshot(method.noise))


def test_dfnd_is_registered_and_validates_options():
    assert get_method("dfnd") is DFND
    ctx, _ = intensity_context(10)
    with pytest.raises(ValueError, match="score"):
        DFND(BNNet(), ctx, DFNDOptions(score="entropy"))
    with pytest.raises(ValueError, match="keep_fraction"):
        DFND(BNNet(), ctx, DFNDOptions(keep_fraction=0.0))


def test_dfnd_keeps_the_top_n_of_a_relevance_score():
    ctx, values = intensity_context()
    method = DFND(BNNet(), ctx, DFNDOptions(keep=7, score="energy"))
    kept = method.begin_epoch(0).indices
    energy = torch.logsumexp(ctx.teacher(ctx.normalize(ctx.images)), dim=1)
    assert set(kept.tolist()) == set(torch.argsort(energy, descending=True)[:7].tolist())
    assert set(kept.tolist()) == set(torch.argsort(values.float(), descending=True)[:7].tolist())
    assert torch.allclose(method.kept_scores, -energy[kept])  # logged negated: lower = kept first


def test_dfnd_batchnorm_score_ranks_by_the_registry_value():
    from kd3.scores import compute_score, teacher_outputs

    torch.manual_seed(0)
    ctx = make_context(BNNet().eval(), random_images(30))
    method = DFND(BNNet(), ctx, DFNDOptions(keep=10, score="minrank:energy+bn_meanlogvar_late"))
    kept = method.begin_epoch(0).indices
    score = compute_score("minrank:energy+bn_meanlogvar_late", teacher_outputs(ctx.teacher, ctx.images, ctx.normalize))
    assert set(kept.tolist()) == set(torch.sort(-score, stable=True).indices[:10].tolist())


class BandTeacher(Net):
    """Logit k = 5 × the mean intensity of the image's k-th horizontal band: random images spread
    over all three classes, with confidences that differ from image to image."""

    def __init__(self):
        super().__init__()
        self.feature_channels = 3
        self.classifier = nn.Linear(3, 3)
        with torch.no_grad():
            self.classifier.weight.copy_(5 * torch.eye(3))
            self.classifier.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        bands = x[:, :, : x.shape[2] // 3 * 3].unflatten(2, (3, -1))  # N×C×3×(H/3)×W
        return bands.mean(dim=(1, 3, 4))[:, :, None, None]


def test_dfnd_per_class_keeps_each_predicted_class_its_most_confident_share():
    images = random_images(60, seed=4)
    teacher = BandTeacher()
    ctx = make_context(teacher, images)
    logits = teacher(ctx.normalize(images))
    labels = logits.argmax(dim=1)
    ce = F.cross_entropy(logits, labels, reduction="none")
    counts = torch.bincount(labels, minlength=3)
    assert counts.min() >= 6  # every class can fill its share of 18 / 3 = 6
    kept = DFND(BNNet(), ctx, DFNDOptions(keep=18, per_class=True)).begin_epoch(0).indices
    expected = torch.cat([members[torch.argsort(ce[members])[:6]]
                          for members in ((labels == k).nonzero().flatten() for k in range(3))])
    assert kept.tolist() == sorted(expected.tolist())
    global_top = set(torch.argsort(ce)[:18].tolist())
    assert set(kept.tolist()) != global_top  # the classes' shares differ from the global top 18 here
