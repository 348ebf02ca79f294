"""Models by name everywhere: tv:/timm: names, did-you-mean, and user architectures from --import / entry points."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

from kd3 import preflight
from kd3.config import ConfigError
from kd3.models import create_model, list_models, plugins, registry
from kd3.models.adapters import TimmNet, TorchvisionNet
from kd3.teacher import TeacherInfo, load_teacher, save_teacher

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is an optional extra")


def first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


# --- tv: and timm: names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,in_channels", [("tv:resnet18", 1), ("tv:mobilenet_v3_small", 3)])
def test_torchvision_names_build_the_requested_classes_and_channels(name, in_channels):
    net = create_model(name, num_classes=5, in_channels=in_channels, image_size=32).eval()
    assert isinstance(net, TorchvisionNet) and net.num_classes == 5
    assert first_conv(net).in_channels == in_channels
    with torch.no_grad():
        assert net(torch.randn(2, in_channels, 32, 32)).shape == (2, 5)
    assert name not in list_models()  # list_models stays the registered names


def test_torchvision_name_with_a_feature_node_cuts_there():
    net = create_model("tv:resnet18@layer3", num_classes=4, in_channels=3, image_size=32).eval()
    with torch.no_grad():
        assert net.features(torch.randn(2, 3, 32, 32)).shape == (2, 256, 2, 2) and net.feature_channels == 256


@needs_timm
def test_timm_names_build_the_requested_classes_and_channels():
    net = create_model("timm:resnet18", num_classes=7, in_channels=1, image_size=32).eval()
    assert isinstance(net, TimmNet) and net.num_classes == 7 and net.model.conv1.in_channels == 1
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_torchvision_teacher_checkpoint_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    net = create_model("tv:resnet18", num_classes=3, in_channels=3, image_size=32)
    for module in net.modules():  # statistics unlike a fresh network's, so they have to be saved and loaded
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    net.eval()
    info = TeacherInfo("tv:resnet18", 3, 3, 32, ["a", "b", "c"], [0.5] * 3, [0.25] * 3, "test", math.nan, math.nan)
    save_teacher(tmp_path / "t.pt", net, info)
    loaded, loaded_info = load_teacher(tmp_path / "t.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert loaded_info.arch == "tv:resnet18" and isinstance(loaded, TorchvisionNet)


# --- unknown names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,suggestion", [
    ("tv:resnet81", "'tv:resnet18'"),
    ("lenet6", "'lenet5'"),
    pytest.param("timm:resnet81", "'timm:resnet18'", marks=needs_timm),
])
def test_unknown_names_suggest_the_closest_in_one_line(name, suggestion):
    with pytest.raises(ValueError) as caught:
        create_model(name, num_classes=3)
    message = str(caught.value)
    assert message.startswith(f"unknown model {name!r}") and f"did you mean {suggestion}" in message
    assert "\n" not in message


def test_torchvision_detection_models_are_not_classifier_names():
    with pytest.raises(ValueError, match="torchvision has no classifier 'fasterrcnn_resnet50_fpn'"):
        create_model("tv:fasterrcnn_resnet50_fpn")


def test_require_model_checks_names_without_building_anything(monkeypatch):
    def no_building(*args, **kwargs):
        raise AssertionError("require_model built a model")

    monkeypatch.setattr(torchvision.models, "get_model", no_building)
    preflight.require_model("tv:resnet18", "student")
    preflight.require_model("tv:resnet18@layer3", "student")
    preflight.require_model("lenet5_bn", "student")
    with pytest.raises(ConfigError, match=r"^student='tv:resnet81' is not a known architecture; .*did you mean 'tv:resnet18'"):
        preflight.require_model("tv:resnet81", "student")


# --- user architectures ----------------------------------------------------------------------------------

@pytest.fixture
def clean_registry(monkeypatch, tmp_path):
    """A registry copy, entry points not yet loaded, and tmp_path importable; the test's modules are forgotten after."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("kd3_test_"):
            del sys.modules[name]


def write_module(folder, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


FACTORY = """
    from kd3.models import create_model, register_model

    calls = []

    def tiny(num_classes=10, in_channels=1, image_size=28, **kwargs):
        calls.append((num_classes, in_channels, image_size))
        return create_model("lenet5_half", num_classes, in_channels, image_size)

    @register_model("{registered}")
    def decorated(num_classes=10, in_channels=1, image_size=28, **kwargs):
        return tiny(num_classes, in_channels, image_size)
"""


def fake_entry_points(monkeypatch, *entries: tuple[str, str]) -> None:
    points = [importlib.metadata.EntryPoint(name=name, value=value, group=plugins.GROUP) for name, value in entries]

    def entry_points(**selection):
        return [p for p in points if selection.get("group") == plugins.GROUP]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_entry_points_register_callables_by_name_and_import_modules(clean_registry, monkeypatch):
    write_module(clean_registry, "kd3_test_factories", FACTORY.format(registered="kd3_test_decorated_a"))
    write_module(clean_registry, "kd3_test_nets", FACTORY.format(registered="kd3_test_from_module"))
    fake_entry_points(monkeypatch, ("kd3_test_ep_net", "kd3_test_factories:tiny"), ("anything", "kd3_test_nets"))
    assert "kd3_test_ep_net" not in list_models()
    # Found from Python, without the CLI: the first unknown name loads the entry points.
    net = create_model("kd3_test_ep_net", num_classes=4, in_channels=3, image_size=32)
    assert net.num_classes == 4 and sys.modules["kd3_test_factories"].calls == [(4, 3, 32)]
    assert "kd3_test_from_module" in list_models()  # the module entry point's @register_model ran
    assert "anything" not in list_models()  # a module is imported, not registered under the entry point's name
    plugins.load_plugins()  # a second load (the CLI's) neither duplicates nor complains
    assert list_models().count("kd3_test_ep_net") == 1


def test_require_model_finds_entry_point_names(clean_registry, monkeypatch):
    write_module(clean_registry, "kd3_test_factories_b", FACTORY.format(registered="kd3_test_decorated_b"))
    fake_entry_points(monkeypatch, ("kd3_test_ep_b", "kd3_test_factories_b:tiny"))
    preflight.require_model("kd3_test_ep_b", "student")
    with pytest.raises(ConfigError, match="did you mean 'kd3_test_ep_b'"):
        preflight.require_model("kd3_test_ep_c", "student")


def test_import_option_modules_register_and_failures_name_the_module(clean_registry, monkeypatch):
    fake_entry_points(monkeypatch)
    write_module(clean_registry, "kd3_test_user_nets", FACTORY.format(registered="kd3_test_user_net"))
    plugins.load_plugins(["kd3_test_user_nets"])
    assert create_model("kd3_test_user_net", num_classes=2).num_classes == 2
    with pytest.raises(ValueError, match=r"^--import kd3_test_missing: cannot import it \(ModuleNotFoundError") as caught:
        plugins.load_plugins(["kd3_test_missing"])
    assert "\n" not in str(caught.value)


def test_a_broken_entry_point_is_named(clean_registry, monkeypatch):
    fake_entry_points(monkeypatch, ("broken", "kd3_test_not_installed:factory"))
    with pytest.raises(ValueError, match=r"entry point broken = kd3_test_not_installed:factory .*cannot load it"):
        create_model("kd3_test_something")


def test_registered_names_cannot_take_the_torchvision_or_timm_prefixes(clean_registry):
    with pytest.raises(ValueError, match="tv:"):
        registry.register_model("tv:mine")
