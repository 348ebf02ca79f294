import importlib.util

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kd3.models import create_model, list_models, register_model, registry
from kd3.models.adapters import TimmNet, from_timm, from_torchvision
from kd3.models.base import Net

NUM_CLASSES = 7  # not the factories' default 10, so a model that ignores num_classes fails

# name -> (feature channels, feature map side for 1×28×28 input, side for 3×32×32 input)
FEATURE_MAPS = {
    "cnn_bn": (128, 7, 8),
    "cnn_small_bn": (64, 7, 8),
    "cnn_small_half_bn": (32, 7, 8),
    "lenet5": (16, 5, 5),
    "lenet5_bn": (16, 5, 5),
    "lenet5_half": (8, 5, 5),
    "lenet5_half_bn": (8, 5, 5),
    "mobilenetv2": (1280, 4, 4),
    "resnet8": (64, 7, 8),
    "resnet20": (64, 7, 8),
    "resnet32": (64, 7, 8),
    "resnet18": (512, 4, 4),
    "resnet34": (512, 4, 4),
    "tv_resnet18": (512, 1, 1),
    "wrn_16_1": (64, 7, 8),
    "wrn_16_2": (128, 7, 8),
    "wrn_40_2": (128, 7, 8),
}
INPUTS = [(1, 28), (3, 32)]
CASES = [(name, c, s) for name in sorted(FEATURE_MAPS) for c, s in INPUTS]



def build(name: str, in_channels: int, image_size: int) -> Net:
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels, image_size=image_size).eval()


def first_conv(net: nn.Module) -> nn.Conv2d:
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d))


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_every_registered_model_has_documented_feature_maps():
    assert list_models() == sorted(FEATURE_MAPS)


@pytest.mark.parametrize("name,in_channels,image_size", CASES)
def test_net_contract_and_gradient_flow(name, in_channels, image_size):
    net = build(name, in_channels, image_size)
    channels, side_28, side_32 = FEATURE_MAPS[name]
    side = side_28 if image_size == 28 else side_32
    x = torch.randn(2, in_channels, image_size, image_size)
    feature_map = net.features(x)
    vector = net.pool(feature_map)
    logits = net(x)
    assert net.feature_channels == channels
    assert feature_map.shape == (2, channels, side, side)
    assert vector.shape == (2, net.classifier.in_features)
    assert (vector >= 0).all()  # every zoo model pools a post-ReLU activation (DAFL's activation loss assumes it)
    assert torch.equal(logits, net.classifier(vector))
    assert logits.shape == (2, NUM_CLASSES) and net.num_classes == NUM_CLASSES
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    grad = first_conv(net).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def lenet_count(c1: int, c2: int, fc1: int, fc2: int, batch_norm: bool, in_channels: int = 1) -> int:
    """The layer formula: conv k·k·in·out (+ out biases, or + 2·out BatchNorm affine), linear in·out + out."""
    conv = in_channels * c1 * 25 + c1 * 25 * c2 + ((2 * c1 + 2 * c2) if batch_norm else (c1 + c2))
    fc = c2 * 5 * 5 * fc1 + fc1 + fc1 * fc2 + fc2 + fc2 * 10 + 10
    return conv + fc


def test_lenet_parameter_counts_match_the_classic_numbers():
    # Classic LeNet-5 on 32×32×1: 156 + 2,416 + 48,120 + 10,164 + 850.
    assert lenet_count(6, 16, 120, 84, batch_norm=False) == 61_706
    # DAFL's half-width student: 78 + 608 + 12,060 + 2,562 + 430.
    assert lenet_count(3, 8, 60, 42, batch_norm=False) == 15_738
    for image_size in (28, 32):  # 28×28 inputs are padded by 2, so the fc sizes are the same
        assert count(create_model("lenet5", 10, 1, image_size)) == 61_706
        assert count(create_model("lenet5_half", 10, 1, image_size)) == 15_738
        assert count(create_model("lenet5_bn", 10, 1, image_size)) == lenet_count(6, 16, 120, 84, True)
        assert count(create_model("lenet5_half_bn", 10, 1, image_size)) == lenet_count(3, 8, 60, 42, True)
    assert count(create_model("lenet5", 10, 3, 32)) == lenet_count(6, 16, 120, 84, False, in_channels=3)


def test_batchnorm_layers_are_where_documented():
    def batchnorms(name: str) -> list[nn.BatchNorm2d]:
        return [m for m in create_model(name).modules() if isinstance(m, nn.BatchNorm2d)]

    assert batchnorms("lenet5") == [] and batchnorms("lenet5_half") == []
    assert [m.num_features for m in batchnorms("lenet5_bn")] == [6, 16]
    assert [m.num_features for m in batchnorms("cnn_bn")] == [32, 32, 64, 64, 128]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in create_model("lenet5_bn").modules())


def test_lenet_rejects_images_too_small_for_two_conv_stages():
    with pytest.raises(ValueError, match="at least 16"):
        create_model("lenet5", image_size=8)


def test_cnn_bn_is_a_small_teacher():
    assert 100_000 <= count(create_model("cnn_bn")) <= 150_000


def test_factory_kwargs_reach_the_architecture():
    slim = create_model("mobilenetv2", width_mult=0.5)
    assert count(slim) < count(create_model("mobilenetv2")) and slim.feature_channels == 1280
    dropped = [m.p for m in create_model("wrn_16_1", dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert dropped and all(p == 0.3 for p in dropped)
    with pytest.raises(TypeError):
        create_model("lenet5", width_mult=2.0)


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'lenet6'.*lenet5_half_bn.*wrn_40_2"):
        create_model("lenet6")


def test_register_model_adds_a_factory_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = {}

    @register_model("tiny_test_net")
    def tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs) -> Net:
        seen.update(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
        return create_model("lenet5_half", num_classes, in_channels, image_size)

    assert "tiny_test_net" in list_models() and list_models() == sorted(list_models())
    assert create_model("tiny_test_net", 3, 1, 32, extra=1).num_classes == 3
    assert seen == {"num_classes": 3, "in_channels": 1, "image_size": 32, "extra": 1}
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(tiny)


def test_torchvision_adapter_matches_the_wrapped_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES).eval()
    net = from_torchvision(model, image_size=32)
    assert not net.training and not net.front.training  # the wrapper takes over the model's mode
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feature_map = net.features(x)
        assert feature_map.shape == (2, 512, 1, 1) and net.feature_channels == 512
        assert torch.equal(net(x), model(x))
        assert torch.equal(net.pool(feature_map), torch.flatten(model.avgpool(feature_map), 1))
    # The same modules, not copies: training the wrapper trains the model, and weights are stored once.
    assert net.classifier is model.fc and net.front.conv1 is model.conv1
    assert count(net) == count(model) and len(net.state_dict()) == len(model.state_dict())


def test_torchvision_adapter_replaces_the_stem_and_head_on_request():
    model = torchvision.models.resnet18(weights=None)
    net = from_torchvision(model, num_classes=5, in_channels=1, image_size=28).eval()
    assert model.conv1.in_channels == 1 and model.fc.out_features == 5 and net.classifier is model.fc
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), model.eval()(x))


def test_torchvision_adapter_pool_runs_everything_between_feature_map_and_classifier():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES).eval()
    net = from_torchvision(model, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)  # large enough that the map is 2×2, so it cannot be the pooled 1×1 one
    with torch.no_grad():
        feature_map = net.features(x)
        assert feature_map.shape == (2, 576, 2, 2)
        assert net.pool(feature_map).shape == (2, 1024)  # pool + Linear(576, 1024) + Hardswish + Dropout
        assert torch.equal(net(x), model(x))


def test_torchvision_adapter_cuts_at_a_named_node():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES).eval()
    net = from_torchvision(model, image_size=32, feature_node="layer3").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert net.features(x).shape == (2, 256, 2, 2) and net.feature_channels == 256
        assert torch.equal(net(x), model(x))


def test_torchvision_adapter_refuses_models_without_a_linear_classifier():
    with pytest.raises(ValueError, match="no nn.Linear classifier"):
        from_torchvision("squeezenet1_1", num_classes=3)


class TimmLike(nn.Module):
    """The slice of timm's model API that TimmNet relies on, so the adapter is tested without timm."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.amax(dim=(2, 3))  # a max-pool head, so a wrapper falling back to average pooling fails
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_timm_adapter_uses_the_models_own_split():
    model = TimmLike()
    net = TimmNet(model)
    x = torch.randn(2, 1, 9, 9)
    assert net.features(x).shape == (2, 4, 4, 4) and net.feature_channels == 4 and net.num_classes == 3
    assert torch.equal(net(x), model(x)) and net.classifier is model.fc
    assert list(net.state_dict()) == ["model.conv.weight", "model.conv.bias", "model.fc.weight", "model.fc.bias"]


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is an optional extra")
def test_timm_adapter_matches_the_wrapped_model():
    net = from_timm("resnet18", num_classes=NUM_CLASSES, in_channels=1).eval()
    assert isinstance(net, TimmNet) and net.feature_channels == 512 and net.num_classes == NUM_CLASSES
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert net.features(x).shape == (2, 512, 1, 1)
        assert torch.equal(net(x), net.model(x))


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="only meaningful without timm")
def test_timm_adapter_explains_the_missing_extra():
    with pytest.raises(ImportError, match=r"kd3\[timm\]"):
        from_timm("resnet18")
