"""The KD³ method end to end on tiny networks: what a step trains, every switch, deployable, state."""
from __future__ import annotations

import copy
import io
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from kd3.data.augment import CropFlip, Normalizer
from kd3.methods.base import Batch, DistillContext, get_method
from kd3.methods.kd3 import KD3, KD3Options
from kd3.models.base import Net

NUM_CLASSES = 4


class GapNet(Net):
    """conv → BN → ReLU → conv (stride) → BN → ReLU, GAP, linear: a tiny ResNet-like Net."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.classifier = nn.Linear(channels, NUM_CLASSES)
        self.feature_channels = channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FlattenNet(GapNet):
    """LeNet-like: the pool is flatten + a fully connected layer, so it needs the exact map size."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.fc = nn.Linear(channels * 4 * 4, 16)
        self.classifier = nn.Linear(16, NUM_CLASSES)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(torch.flatten(feature_map, 1)))


def make_ctx(teacher: Net, pool_size: int = 48, epochs: int = 6) -> DistillContext:
    images = torch.randint(0, 256, (pool_size, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return DistillContext(teacher=teacher.eval().requires_grad_(False), images=images,
                          normalize=Normalizer((0.5,), (0.25,)), augment=CropFlip(padding=1), num_classes=NUM_CLASSES,
                          epochs=epochs, batch_size=16, device=torch.device("cpu"), seed=0,
                          cache_dir=Path(tempfile.mkdtemp(prefix="kd3-test-cache-")), progress=False)  # view caches go here


def confident(teacher: Net) -> Net:
    """A random net is unsure of everything, and nothing clears τ = 0.95; sharpen its logits."""
    with torch.no_grad():
        teacher.classifier.weight.mul_(40)
    return teacher


def build(teacher: Net | None = None, student: Net | None = None, seed: int = 0, **options) -> KD3:
    torch.manual_seed(seed)
    teacher = teacher if teacher is not None else confident(GapNet(8))
    student = student if student is not None else GapNet(4)
    return KD3(student, make_ctx(teacher), KD3Options(**options))


def train_steps(method: KD3, steps: int = 1, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """begin_epoch, then ``steps`` SGD steps over trainable_parameters, as the trainer does them."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    plan = method.begin_epoch(0)
    method.train()
    history = []
    for step in range(steps):
        indices = plan.indices[torch.randperm(len(plan.indices))[:16]]
        losses = method.training_step(Batch(indices=indices, images=method.ctx.images[indices]))
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        history.append(losses)
    return history


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_registered_and_options_validated():
    assert get_method("kd3") is KD3
    with pytest.raises(ValueError, match="selection_view"):
        KD3Options(selection_view="sideways")
    with pytest.raises(ValueError, match="not a submodule"):
        build(mix_location="nowhere")


def test_step_trains_student_and_projector_never_the_teacher():
    method = build()
    teacher_before, student_before = snapshot(method.teacher), snapshot(method.student)
    projector_before = snapshot(method.projector)
    losses = train_steps(method)[0]
    assert set(losses) == {"wfa", "ia"}
    assert same(snapshot(method.teacher), teacher_before)  # classifier and BN statistics included
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not any(p is q for p in method.trainable_parameters() for q in method.teacher.parameters())
    assert not same(snapshot(method.student), student_before)
    assert not same(snapshot(method.projector), projector_before)
    # Shared classifier: the student's own classifier is not used.
    assert method.student.classifier.weight.grad is None
    metrics = method.epoch_metrics()
    assert 0.5 < metrics["mean_weight"] < 1
    assert {"selected", "selected_per_class", "class_thresholds", "teacher_weight", "empty_selection",
            "feature_mse", "ia_student", "ia_teacher"} <= set(metrics)
    assert len(metrics["selected_per_class"]) == len(metrics["class_thresholds"]) == NUM_CLASSES


def test_wfa_is_the_weighted_feature_mse():
    method = build(mixdistribution=False)
    method.train()
    torch.manual_seed(3)
    indices = torch.arange(16)
    x, teacher_map, teacher_logits = method.targets(Batch(indices=indices, images=method.ctx.images[indices]))
    torch.manual_seed(3)
    losses = method.training_step(Batch(indices=indices, images=method.ctx.images[indices]))
    # Recompute by hand from the outputs the step saw (BN in train mode gives the same batch statistics).
    projected = method.projector(method.student.features(x))
    logits = method.teacher.classifier(method.teacher.pool(projected))
    weights = torch.sigmoid((logits - teacher_logits).norm(dim=1))
    expected = (weights.view(-1, 1, 1, 1) * (projected - teacher_map) ** 2).mean()
    assert losses["wfa"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mixdistribution_off_removes_the_perturbed_forward_and_ia():
    calls = []
    method = build(mixdistribution=False)
    method.student.body.register_forward_pre_hook(lambda *_: calls.append(1))
    before = len(calls)
    method.train()
    indices = torch.arange(16)
    losses = method.training_step(Batch(indices=indices, images=method.ctx.images[indices]))
    assert set(losses) == {"wfa"} and len(calls) - before == 1
    assert method.student_embedding is None and method.teacher_embedding is None
    assert "ia_student" not in method.epoch_metrics()

    on = build()
    on.student.body.register_forward_pre_hook(lambda *_: calls.append(1))
    before = len(calls)
    on.train()
    losses = on.training_step(Batch(indices=indices, images=on.ctx.images[indices]))
    assert "ia" in losses and len(calls) - before == 2
    sum(losses.values()).backward()
    assert on.student_embedding.linear.weight.grad is not None


def test_mix_at_a_stage_perturbs_that_stage():
    method = build(mix_location="body.2")
    seen = []  # (input, output) of the student backbone: clean forward, then perturbed forward
    method.student.body.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    losses = train_steps(method)[0]
    (clean_in, clean_out), (perturbed_in, perturbed_out) = seen[-2:]
    assert torch.equal(clean_in, perturbed_in) and not torch.allclose(clean_out, perturbed_out)
    assert losses["ia"].item() > 0 and not method.student.body[2]._forward_hooks  # hook removed after use


def test_selection_off_trains_on_the_whole_pool():
    method = build(selection=False)
    plan = method.begin_epoch(0)
    assert torch.equal(plan.indices, torch.arange(method.ctx.pool_size))
    assert method.epoch_metrics() == {"selected": method.ctx.pool_size}


def test_selection_on_scores_in_eval_mode_and_restores_train_mode():
    method = build()
    method.train()
    bn_before = snapshot(method.student)
    plan = method.begin_epoch(0)
    assert method.training and method.student.training and not method.teacher.training
    assert same(snapshot(method.student), bn_before)  # eval mode: no BatchNorm statistics moved
    record = method.epoch_metrics()
    assert record["selected"] == len(plan.indices) and sum(record["selected_per_class"]) == record["selected"]
    assert record["teacher_weight"] == pytest.approx(method.teacher_weight(0))


def test_clean_selection_caches_teacher_logits_once_and_is_deterministic():
    calls = []
    method = build(selection_view="clean")
    method.teacher.body.register_forward_pre_hook(lambda *_: calls.append(1))
    first = method.begin_epoch(0).indices
    after_first = len(calls)
    second = method.begin_epoch(0).indices
    assert after_first == 3 and len(calls) == after_first  # 48 images / 16 per chunk, then cached
    assert torch.equal(first, second)


def test_empty_selection_warns_and_falls_back_to_the_pool():
    teacher = GapNet(8)
    nn.init.zeros_(teacher.classifier.weight)
    nn.init.zeros_(teacher.classifier.bias)
    method = build(teacher=teacher)  # shared zero classifier: every q is uniform, all predicted class 0
    with pytest.warns(RuntimeWarning, match="no pool image cleared"):
        plan = method.begin_epoch(0)
    assert torch.equal(plan.indices, torch.arange(method.ctx.pool_size))
    metrics = method.epoch_metrics()
    assert metrics["empty_selection"] is True and metrics["selected"] == 0


def test_uniform_weighting_gives_weight_one():
    method = build(weighting="uniform", mixdistribution=False)
    train_steps(method)
    assert method.epoch_metrics()["mean_weight"] == 1.0


def test_classifier_sharing_off_uses_the_students_own_classifier():
    method = build(classifier_sharing=False)
    losses = train_steps(method)[0]
    assert set(losses) == {"wfa", "kd", "ia"}
    assert method.student.classifier.weight.grad is not None
    method.eval()
    x = torch.randn(5, 1, 8, 8)
    _, _, logits = method._student_outputs(x)
    assert torch.equal(logits, method.student(x))
    assert torch.equal(method.deployable()(x), method.student(x))


def test_teacher_contrastive_off_leaves_student_bit_identical():
    on, off = build(teacher_contrastive=True), build(teacher_contrastive=False)
    teacher_head_before = snapshot(off.teacher_embedding)
    assert same(snapshot(on), snapshot(off))
    history_on, history_off = train_steps(on, steps=3), train_steps(off, steps=3)
    for module in ("student", "projector", "student_embedding"):
        assert same(snapshot(getattr(on, module)), snapshot(getattr(off, module))), module
    assert same(snapshot(off.teacher_embedding), teacher_head_before)
    assert not same(snapshot(on.teacher_embedding), teacher_head_before)
    assert history_on[-1]["ia"] > history_off[-1]["ia"]  # the teacher term is really there when on
    assert "ia_teacher" not in off.epoch_metrics()


def deployable_after_training(method: KD3) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Two training steps, then (inputs, the training-time student logits on them, the deployable),
    for tests that check the deployable computes exactly those logits."""
    train_steps(method, steps=2)
    method.eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        return x, method._student_outputs(x)[2], method.deployable()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # deprecated in torch 2.9+, still what kd3 exports with
@pytest.mark.parametrize("teacher_cls, student_cls", [(GapNet, GapNet), (FlattenNet, FlattenNet)])
def test_deployable_equals_training_time_logits(teacher_cls, student_cls):
    method = build(teacher=confident(teacher_cls(8)), student=student_cls(4))
    x, expected, deployed = deployable_after_training(method)
    with torch.no_grad():
        assert torch.equal(deployed(x), expected)
        assert torch.equal(torch.jit.trace(deployed, x)(x), expected)
    assert not any(p.requires_grad for p in deployed.parameters())
    # Only the parts the deployed model runs are in it: no teacher backbone, no unused student layers.
    teacher_head = {n for n, _ in deployed.head.named_parameters()}
    assert not any(n.startswith("body.") for n in teacher_head)
    if teacher_cls is FlattenNet:
        assert {"fc.weight", "classifier.weight"} <= teacher_head
        assert not any(n.startswith("fc.") for n, _ in deployed.backbone.named_parameters())
    # The snapshot does not move with further training, and building it drew no random numbers.
    state = torch.get_rng_state()
    method.deployable()
    assert torch.equal(torch.get_rng_state(), state)


def test_spatial_mismatch_pools_the_larger_map():
    method = build(student=GapNet(4, stride=1))  # student map 8×8, teacher 4×4
    assert method.feature_shape == (8, 4, 4)
    losses = train_steps(method)[0]
    assert torch.isfinite(losses["wfa"])
    with pytest.raises(ValueError, match="cannot take the smaller map"):
        build(teacher=FlattenNet(8), student=GapNet(4, stride=4))  # 2×2 student map, teacher needs 4×4


def test_cached_teacher_views_feed_the_step():
    method = build(teacher_views=2)
    assert method.targets.cached
    losses = train_steps(method, steps=2)[-1]
    assert method.targets.maps.dtype == torch.float16 and method.targets.maps.shape == (48, 2, 8, 4, 4)
    assert torch.isfinite(sum(losses.values()))
    with pytest.warns(UserWarning, match="running the teacher every step"):
        assert not build(teacher_views=2, teacher_cache_gb=1e-9).targets.cached


def test_state_round_trip():
    method = build()
    train_steps(method, steps=2)
    buffer = io.BytesIO()
    torch.save({"method": method.state_dict(), "state": method.method_state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = build(teacher=copy.deepcopy(method.teacher), seed=1)  # the teacher is not in a checkpoint
    assert not same(snapshot(restored), snapshot(method))
    restored.load_state_dict(saved["method"])
    restored.load_method_state(saved["state"])
    assert same(snapshot(restored), snapshot(method))
    assert torch.equal(restored.selection_record["indices"], method.selection_record["indices"])
    assert {k: v for k, v in restored.epoch_metrics().items() if k in method.selection_record} == \
        {k: v for k, v in method.epoch_metrics().items() if k in method.selection_record}
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(restored.deployable()(x), method.deployable()(x))


# -- relevance scores in place of the blended confidence ---------------------------------------------
def test_released_rule_stays_the_default():
    options = KD3Options()
    assert options.selection_score == "blended" and options.thresholds == "auto"
    assert options.threshold_rule == "flexmatch"
    assert KD3Options(selection_score="energy").threshold_rule == "percentile"
    assert KD3Options(thresholds="percentile").threshold_rule == "percentile"
    assert KD3Options(selection_score="energy", thresholds="flexmatch").threshold_rule == "flexmatch"


@pytest.mark.parametrize("bad", [{"selection_score": "confidence"}, {"thresholds": "topk"}, {"keep_fraction": 0.0},
                                 {"keep_fraction": 1.5}])
def test_score_options_are_validated(bad):
    with pytest.raises(ValueError, match="kd3 options"):
        KD3Options(**bad)


def fixed_scoring(method: KD3, prediction: torch.Tensor) -> torch.Tensor:
    """Make the blended scoring pass return a known (confidence, prediction); returns that confidence."""
    confidence = torch.linspace(0.3, 1.0, method.ctx.pool_size)
    method._score_pool = lambda weight: (confidence, prediction)
    return confidence


def pool_scores(method: KD3, name: str) -> torch.Tensor:
    from kd3.scores import compute_score, teacher_outputs

    ctx = method.ctx
    return compute_score(name, teacher_outputs(method.teacher, ctx.images, ctx.normalize, ctx.batch_size))


def test_relevance_score_replaces_the_blended_confidence_under_the_budget(monkeypatch):
    import kd3.methods.kd3.method as kd3_method
    from kd3.methods.kd3.selection import percentile_select

    passes = []
    real = kd3_method.teacher_outputs
    monkeypatch.setattr(kd3_method, "teacher_outputs", lambda *a, **k: passes.append(1) or real(*a, **k))
    method = build(selection_score="bn_mean_all", keep_fraction=0.25)
    prediction = torch.arange(method.ctx.pool_size) % 3  # class 3 predicted by nobody
    fixed_scoring(method, prediction)
    first = method.begin_epoch(0).indices
    second = method.begin_epoch(1).indices
    assert len(passes) == 1  # the teacher's score is computed once per run
    expected = percentile_select(pool_scores(method, "bn_mean_all"), prediction, NUM_CLASSES, 0.25)
    assert torch.equal(first, expected.indices) and torch.equal(second, first)
    assert len(first) == 9  # budget floor(0.25 · 48) = 12, share 3 per class, class 3 predicted by nobody
    record = method.epoch_metrics()
    assert record["selected_per_class"] == [3, 3, 3, 0]


def test_flexmatch_on_a_relevance_score_reads_its_pool_percentiles():
    from kd3.methods.kd3.selection import select
    from kd3.scores import percentile_ranks

    method = build(selection_score="energy", thresholds="flexmatch")
    prediction = torch.arange(method.ctx.pool_size) % 2
    fixed_scoring(method, prediction)
    indices = method.begin_epoch(0).indices
    expected = select(percentile_ranks(pool_scores(method, "energy")), prediction, NUM_CLASSES, 0.95)
    assert torch.equal(indices, expected.indices) and len(indices) > 0


def test_percentile_thresholds_on_the_blended_confidence():
    from kd3.methods.kd3.selection import percentile_select

    method = build(thresholds="percentile", keep_fraction=0.5)
    prediction = torch.arange(method.ctx.pool_size) % 4
    confidence = fixed_scoring(method, prediction)
    expected = percentile_select(confidence, prediction, NUM_CLASSES, 0.5)
    assert torch.equal(method.begin_epoch(0).indices, expected.indices)
    assert method.relevance is None  # no teacher-only score was needed
