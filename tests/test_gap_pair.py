"""Issue 11, the paper's network regime: the small GAP teacher/student pair (cnn_small_bn /
cnn_small_half_bn) and KD³'s ``sharing: pooled``, which shares only the teacher's last linear layer."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kd3.bench.spec import load_spec
from kd3.config import DistillConfig, TeacherTrainConfig, load_config
from kd3.engine.export import export_onnx, export_torchscript, load_torchscript
from kd3.methods.base import Batch
from kd3.methods.kd3 import KD3Options
from kd3.methods.kd3.deploy import PooledSharedClassifierStudent
from kd3.methods.kd3.projector import PooledProjector, Projector
from kd3.models import create_model
from test_kd3_method import FlattenNet, GapNet, build, confident, deployable_after_training, train_steps


def multiply_adds(net: nn.Module, x: torch.Tensor) -> int:
    """Conv and linear multiply-adds of one forward on ``x`` (one image)."""
    total = 0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in net.modules()]
    with torch.no_grad():
        net.eval()(x)
    for handle in handles:
        handle.remove()
    return total


# -- the GAP pair ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, channels", [("cnn_small_bn", 64), ("cnn_small_half_bn", 32)])
@pytest.mark.parametrize("image_size", [28, 32])
def test_small_pair_shapes_and_pool_is_gap(name, channels, image_size):
    torch.manual_seed(0)
    net = create_model(name, num_classes=10, in_channels=1, image_size=image_size).eval()
    x = torch.randn(3, 1, image_size, image_size)
    with torch.no_grad():
        feature_map = net.features(x)
        side = image_size // 4  # two 2×2 max-pools
        assert feature_map.shape == (3, channels, side, side)
        assert net.feature_channels == channels and net.classifier.in_features == channels
        pooled = net.pool(feature_map)
        assert torch.allclose(pooled, feature_map.mean(dim=(2, 3)), atol=1e-6)
        assert torch.allclose(net(x), net.classifier(feature_map.mean(dim=(2, 3))), atol=1e-5)
    assert net(x).shape == (3, 10)
    # GAP + ONE linear layer: the classifier is the only Linear in the network.
    assert [m for m in net.modules() if isinstance(m, nn.Linear)] == [net.classifier]


def test_small_pair_sizes():
    teacher = create_model("cnn_small_bn", num_classes=10, in_channels=1, image_size=28)
    student = create_model("cnn_small_half_bn", num_classes=10, in_channels=1, image_size=28)
    x = torch.zeros(1, 1, 28, 28)
    teacher_cost, student_cost = multiply_adds(teacher, x), multiply_adds(student, x)
    assert teacher_cost <= 3_000_000  # cheap enough for 5-seed CPU benches
    assert student_cost * 3 < teacher_cost  # half width: about a quarter of the cost
    parameters = [sum(p.numel() for p in net.parameters()) for net in (teacher, student)]
    assert parameters == [24058, 6274]
    # cnn_bn (now built from the same parametrised class) is unchanged.
    cnn_bn = create_model("cnn_bn", num_classes=10, in_channels=1, image_size=28)
    assert sum(p.numel() for p in cnn_bn.parameters()) == 140458
    assert [m.out_channels for m in cnn_bn.modules() if isinstance(m, nn.Conv2d)] == [32, 32, 64, 64, 128]


# -- KD³ sharing: pooled -----------------------------------------------------------------------------
def test_sharing_option_validated_and_map_is_the_default():
    with pytest.raises(ValueError, match=r"sharing='fc'; valid: map, pooled"):
        KD3Options(sharing="fc")
    assert KD3Options().sharing == "map"
    assert isinstance(build().projector, Projector)


def pooled_method(**options):
    """LeNet-like teacher (pool = flatten + fc, 16-d) and a GAP student (4-d pooled vector)."""
    return build(teacher=confident(FlattenNet(8)), student=GapNet(4), sharing="pooled", **options)


def test_pooled_sharing_logits_are_the_teachers_classifier_on_projected_student_pool():
    method = pooled_method()
    assert isinstance(method.projector, PooledProjector)
    first, last = method.projector.layers[0], method.projector.layers[-3]
    assert (first.in_features, last.out_features) == (4, 16)  # student pooled width → teacher's
    train_steps(method, steps=2)
    method.eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        pooled = method.student.features(x).mean(dim=(2, 3))  # GapNet's pool, written out
        hidden = method.projector.layers[:3](pooled)
        phi = method.projector.layers[3:](hidden)
        expected = phi @ method.teacher.classifier.weight.t() + method.teacher.classifier.bias
        _, projected, logits = method._student_outputs(x)
        assert torch.allclose(projected, phi, atol=1e-6)
        assert torch.allclose(logits, expected, atol=1e-5)
        # Only the teacher's last linear layer is shared: its fc (LeNet's fc stack) is not used.
        method.teacher.fc.weight.mul_(3)
        assert torch.equal(method._student_outputs(x)[2], logits)


def test_pooled_sharing_aligns_with_the_teachers_pooled_vector():
    method = pooled_method(weighting="uniform", mixdistribution=False)
    method.begin_epoch(0)
    method.train()
    indices = torch.arange(16)
    batch_images = method.ctx.images[indices]
    torch.manual_seed(3)
    losses = method.training_step(Batch(indices=indices, images=batch_images))
    assert set(losses) == {"wfa"}
    torch.manual_seed(3)  # the same augmented views again
    x, teacher_map, _ = method.targets(Batch(indices=indices, images=batch_images))
    with torch.no_grad():
        target = torch.relu(method.teacher.fc(torch.flatten(teacher_map, 1)))  # FlattenNet's pool
        projected = method.projector(method.student.features(x).mean(dim=(2, 3)))
        expected = (projected - target).pow(2).mean(dim=1).mean()
    assert target.shape == (16, 16)
    assert torch.allclose(losses["wfa"].detach(), expected, rtol=1e-5)


def test_pooled_sharing_works_where_the_map_is_too_small_for_the_teachers_pool():
    # A 2×2 student map cannot feed FlattenNet's pool (it needs 4×4): map sharing rejects the pair,
    # pooled sharing never runs the teacher's pool on the student.
    with pytest.raises(ValueError, match="cannot take the smaller map"):
        build(teacher=FlattenNet(8), student=GapNet(4, stride=4))
    method = build(teacher=confident(FlattenNet(8)), student=GapNet(4, stride=4), sharing="pooled")
    assert method.feature_shape == (8, 4, 4)  # F_T at the teacher's own size
    assert torch.isfinite(sum(train_steps(method)[0].values()))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.parametrize("student_cls", [GapNet, FlattenNet])
def test_pooled_deployable_equals_training_time_logits_and_exports(student_cls, tmp_path):
    method = pooled_method() if student_cls is GapNet else build(
        teacher=confident(FlattenNet(8)), student=FlattenNet(4), sharing="pooled")
    x, expected, deployed = deployable_after_training(method)
    assert isinstance(deployed, PooledSharedClassifierStudent)
    with torch.no_grad():
        assert torch.equal(deployed(x), expected)
    assert not any(p.requires_grad for p in deployed.parameters())
    # Student backbone + its pool + φ + the teacher's classifier; nothing else of the teacher.
    names = {n for n, _ in deployed.named_parameters()}
    assert {"classifier.weight", "classifier.bias"} <= names
    assert not any(n.startswith(("head.", "body.", "fc.")) for n in names)
    assert torch.equal(deployed.classifier.weight, method.teacher.classifier.weight)
    if student_cls is FlattenNet:  # the student's own fc stack is its pool, so it ships
        assert "backbone.fc.weight" in names
    # Exported as kd3 ships it: traced TorchScript (round trip) and ONNX from that.
    path = export_torchscript(deployed, x[:1], {"method": "kd3"}, tmp_path / "student.ts")
    module, meta = load_torchscript(path)
    assert meta == {"method": "kd3"}
    with torch.no_grad():
        assert torch.allclose(module(x), expected, atol=1e-6)
    onnx = pytest.importorskip("onnx")
    onnx_path = export_onnx(module, x[:1], tmp_path / "student.onnx")
    onnx.checker.check_model(onnx.load(str(onnx_path)))


def test_pooled_sharing_off_ships_the_student_itself():
    method = pooled_method(classifier_sharing=False)
    losses = train_steps(method)[0]
    assert set(losses) == {"wfa", "kd", "ia"}
    method.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(method._student_outputs(x)[2], method.student(x))
        assert torch.equal(method.deployable()(x), method.student(x))


# -- configs -----------------------------------------------------------------------------------------
def test_gap_configs_keep_the_fashion_wild_budget_and_specs_load():
    lenet = load_config(DistillConfig, "configs/fashion-wild/blind_kd.yaml")
    for row in ("blind_kd", "oracle", "kd3", "dfnd-relevance", "recommended"):
        config = load_config(DistillConfig, f"configs/fashion-wild-gap/{row}.yaml")
        assert config.student == "cnn_small_half_bn"
        assert config.teacher.checkpoint == "{cache}/teachers/fashion-cnn_small_bn.pt"
        # The recipe adds its one epoch of warmup to the pool's shared schedule, on either pair alike.
        train = config.train if row != "recommended" else dataclasses.replace(config.train, warmup_epochs=0.0)
        assert (train, config.augment, config.eval_data) == (lenet.train, lenet.augment, lenet.eval_data)
        assert dataclasses.replace(config.pool, oracle=False) == lenet.pool
        assert config.pool.oracle == (row == "oracle")
        if config.method["name"] == "kd3":
            KD3Options(**{k: v for k, v in config.method.items() if k != "name"})
    recipe = load_config(TeacherTrainConfig, "configs/teachers/fashion-cnn_small_bn.yaml")
    assert recipe.model == "cnn_small_bn" and recipe.output == "{cache}/teachers/fashion-cnn_small_bn.pt"
    gap = load_spec("fashion-wild-gap")
    assert [r.name for r in gap.rows] == ["teacher", "oracle", "blind_kd", "kd3", "kd3-no-sharing", "dfnd-relevance",
                                          "recommended-fixed30", "recommended"]
    # The recommended recipe runs here and on digits-wild exactly as chosen on fashion-wild's LeNet pair.
    chosen = load_config(DistillConfig, "configs/fashion-wild/recommended.yaml").method
    assert chosen["score"] == "bn_grid_maha"
    earlier = load_config(DistillConfig, "configs/fashion-wild/recommended-fixed30.yaml").method
    for pool in ("fashion-wild-gap", "digits-wild"):
        assert load_config(DistillConfig, f"configs/{pool}/recommended.yaml").method == chosen
        assert load_config(DistillConfig, f"configs/{pool}/recommended.yaml").train.warmup_epochs == 1
        assert load_config(DistillConfig, f"configs/{pool}/recommended-fixed30.yaml").method == earlier
    assert gap.seeds == [0, 1, 2, 3, 4] and gap.row("kd3-no-sharing").overrides == ["method.classifier_sharing=false"]
    lenet_spec = load_spec("fashion-wild")
    assert lenet_spec.row("kd3-pooled").overrides == ["method.sharing=pooled"]
