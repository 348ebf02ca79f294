"""``kd3 teacher import``: your own classifier as a kd3 teacher, loaded without running code, proven before written."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os

import pytest
import torch
import torchvision
from torch import nn

from kd3 import teacher_import
from kd3.preprocessing import Preprocessing
from kd3.teacher import load_teacher
from kd3.teacher_cli import IMAGENET_MEAN, IMAGENET_STD, add_teacher_parser, parse_classes
from kd3.teacher_import import import_teacher
from kd3.utils.safe_load import UnsafeFileError

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is an optional extra")
CLASSES = ("cat", "dog", "bird")
PREPROCESSING = Preprocessing(32, 3, IMAGENET_MEAN, IMAGENET_STD, CLASSES)


def trained_like(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics, so weights that did not land (or landed in training mode) change the logits."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return trained_like(torchvision.models.resnet18(weights=None, num_classes=len(CLASSES)))


def normalised_batch(preprocessing: Preprocessing, n: int = 4) -> torch.Tensor:
    """Images as a user would feed the teacher: 0-255 pixels, /255, then the recorded mean/std."""
    pixels = torch.randint(0, 256, (n, preprocessing.in_channels, preprocessing.image_size, preprocessing.image_size),
                           generator=torch.Generator().manual_seed(1)).float() / 255
    mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def assert_same_logits(checkpoint, model: nn.Module) -> None:
    teacher, info = load_teacher(checkpoint)
    x = normalised_batch(info.preprocessing)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def nothing_written(folder) -> bool:
    return not any(p.name.startswith((".teacher", "teacher")) for p in folder.iterdir())


# --- what imports ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["plain", "nested", "ddp"])
def test_state_dict_file_gives_the_original_logits_and_round_trips(tmp_path, resnet, wrap):
    state = resnet.state_dict()
    saved = {"plain": state, "nested": {"epoch": 90, "state_dict": state},
             "ddp": {f"module.{key}": value for key, value in state.items()}}[wrap]
    torch.save(saved, tmp_path / "resnet.pth")
    path, info = import_teacher(tmp_path / "resnet.pth", "tv:resnet18", PREPROCESSING, tmp_path / "teacher.pt")
    assert path == tmp_path / "teacher.pt"
    assert_same_logits(path, resnet)
    assert (info.arch, info.classes, info.num_classes, info.in_channels, info.image_size) == \
        ("tv:resnet18", list(CLASSES), 3, 3, 32)
    assert info.mean == list(IMAGENET_MEAN) and info.std == list(IMAGENET_STD) and info.data == "imported:resnet.pth"
    assert math.isnan(info.test_accuracy) and math.isnan(info.val_accuracy)
    assert info.recipe == {"imported_from": str(tmp_path / "resnet.pth"),
                           "source_sha256": hashlib.sha256((tmp_path / "resnet.pth").read_bytes()).hexdigest()}
    assert repr(load_teacher(path)[1]) == repr(info)  # the record on disk is the one returned (repr: NaN != NaN)


def test_full_torchvision_model_file_loads(tmp_path, resnet):
    torch.save(resnet, tmp_path / "resnet.pt")
    path, _ = import_teacher(tmp_path / "resnet.pt", "tv:resnet18", PREPROCESSING, tmp_path / "teacher.pt")
    assert_same_logits(path, resnet)


def test_full_model_using_torchvision_ops_and_a_feature_node(tmp_path):
    torch.manual_seed(0)
    model = trained_like(torchvision.models.mobilenet_v3_small(weights=None, num_classes=3))  # torchvision.ops blocks
    torch.save(model, tmp_path / "mnv3.pt")
    path, info = import_teacher(tmp_path / "mnv3.pt", "tv:mobilenet_v3_small", PREPROCESSING, tmp_path / "teacher.pt",
                                feature_node="features.6")
    assert info.arch == "tv:mobilenet_v3_small@features.6"
    assert_same_logits(path, model)
    teacher, _ = load_teacher(path)
    assert teacher.features(torch.zeros(1, 3, 32, 32)).shape[1] == 40  # the block named, not the last one (576)


@needs_timm
def test_full_timm_model_names_its_own_architecture(tmp_path):
    import timm

    model = trained_like(timm.create_model("resnet18", pretrained=False, num_classes=3))
    torch.save(model, tmp_path / "timm.pt")
    path, info = import_teacher(tmp_path / "timm.pt", None, PREPROCESSING, tmp_path / "teacher.pt")
    assert info.arch == "timm:resnet18"
    assert_same_logits(path, model)


def test_in_memory_module_and_grey_kd3_architecture(tmp_path):
    from kd3.models import create_model

    net = trained_like(create_model("lenet5_bn", num_classes=2, in_channels=1, image_size=28)).train()
    grey = Preprocessing(28, 1, (0.5,), (0.25,), ("zero", "one"))
    path, info = import_teacher(net, "lenet5_bn", grey, tmp_path / "teacher.pt")
    assert net.training  # the caller's module is left as it was
    assert info.data == f"imported:in-memory {type(net).__name__}"
    assert_same_logits(path, net)


# --- what is refused -------------------------------------------------------------------------------------

class Foreign(nn.Module):
    """A class of the user's own: its module would run on unpickling, so a full-model file holding it is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)


class RunsACommand:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_that_calls_os_system_is_refused_without_running(tmp_path, zip_format):
    marker = tmp_path / "ran"
    torch.save({"fc.weight": torch.zeros(3, 4), "payload": RunsACommand(marker)}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeFileError, match=r"^refusing to load .*evil.pt: it references (posix|nt|os)\.system") as caught:
        import_teacher(tmp_path / "evil.pt", "tv:resnet18", PREPROCESSING, tmp_path / "teacher.pt")
    assert "\n" not in str(caught.value)
    assert not marker.exists() and nothing_written(tmp_path)


@pytest.mark.parametrize("payload,named", [(Foreign(), "Foreign"), ({"act": nn.functional.relu}, "torch.nn.functional.relu")])
def test_globals_outside_torch_nn_classes_torchvision_timm_are_refused(tmp_path, payload, named):
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(UnsafeFileError, match=f"it references [\\w.]*{named}, which is not"):
        import_teacher(tmp_path / "model.pt", "tv:resnet18", PREPROCESSING, tmp_path / "teacher.pt")
    assert nothing_written(tmp_path)


def test_wrong_class_count_names_the_head_and_writes_nothing(tmp_path, resnet):
    torch.save(resnet.state_dict(), tmp_path / "resnet.pt")
    five = Preprocessing(32, 3, IMAGENET_MEAN, IMAGENET_STD, ("a", "b", "c", "d", "e"))
    with pytest.raises(ValueError) as caught:
        import_teacher(tmp_path / "resnet.pt", "tv:resnet18", five, tmp_path / "teacher.pt")
    assert "fc.weight is 3×512, the 5 classes need 5×512" in str(caught.value) and "\n" not in str(caught.value)
    assert nothing_written(tmp_path)


def test_wrong_key_names_are_listed_and_nothing_written(tmp_path, resnet):
    renamed = {f"backbone.{key}": value for key, value in resnet.state_dict().items()}
    with pytest.raises(ValueError) as caught:
        import_teacher(renamed, "tv:resnet18", PREPROCESSING, tmp_path / "teacher.pt")
    message = str(caught.value)
    assert "missing conv1.weight" in message and "unexpected backbone.conv1.weight" in message and "\n" not in message
    assert nothing_written(tmp_path)


def test_wrong_channel_count_names_the_stem(tmp_path, resnet):
    grey = Preprocessing(32, 1, (0.5,), (0.5,), CLASSES)
    with pytest.raises(ValueError, match="conv1.weight is 64×3×7×7, 1-channel input needs 64×1×7×7"):
        import_teacher(resnet.state_dict(), "tv:resnet18", grey, tmp_path / "teacher.pt")


def test_weights_that_do_not_land_are_caught_by_the_logits_check(tmp_path, resnet, monkeypatch):
    monkeypatch.setattr(teacher_import, "_load_strictly", lambda *args: None)  # as if loading silently did nothing
    with pytest.raises(ValueError, match="does not reproduce the state dict given: logits differ"):
        import_teacher(resnet.state_dict(), "tv:resnet18", PREPROCESSING, tmp_path / "teacher.pt")
    assert nothing_written(tmp_path)


def test_a_state_dict_needs_an_arch_and_out_must_not_be_the_source(tmp_path, resnet):
    torch.save(resnet.state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match=r"give the architecture \(--arch\)"):
        import_teacher(tmp_path / "teacher.pt", None, PREPROCESSING, tmp_path / "out.pt")
    with pytest.raises(ValueError, match="is the weights file itself"):
        import_teacher(tmp_path / "teacher.pt", "tv:resnet18", PREPROCESSING, tmp_path / "teacher.pt")
    with pytest.raises(FileNotFoundError, match="gone.pt does not exist"):
        import_teacher(tmp_path / "gone.pt", "tv:resnet18", PREPROCESSING, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


# --- the command -----------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kd3")
    add_teacher_parser(root.add_subparsers(dest="command", required=True))
    return root


def run(*argv: str) -> None:
    args = parser().parse_args(list(argv))
    args.func(args)


def test_import_command_prints_the_summary_and_the_next_command(tmp_path, resnet, capsys):
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    (tmp_path / "classes.txt").write_text("cat\n\ndog\nbird\n")
    out = tmp_path / "teacher.pt"
    run("teacher", "import", str(tmp_path / "resnet.pth"), "--arch", "tv:resnet18", "--classes", str(tmp_path / "classes.txt"),
        "--image-size", "32", "--norm", "imagenet", "--out", str(out))
    printed = capsys.readouterr().out
    _, info = load_teacher(out)
    assert info.classes == list(CLASSES) and info.mean == list(IMAGENET_MEAN) and info.std == list(IMAGENET_STD)
    for fragment in ["arch      tv:resnet18", "classes   3: cat, dog, bird", "3×32×32", f"sha256    {info.sha256}",
                     f"written   {out}", f"kd3 distill recommended teacher.checkpoint={out} pool.path="]:
        assert fragment in printed, printed
    assert len(printed.splitlines()) < 24  # one screen

    run("teacher", "show", str(out))
    shown = capsys.readouterr().out
    for fragment in ["arch      tv:resnet18", "classes   3: cat, dog, bird", info.sha256, "mean 0.485,0.456,0.406",
                     "val not measured, test not measured", "data      imported:resnet.pth"]:
        assert fragment in shown, shown


def test_import_command_takes_explicit_mean_and_std(tmp_path, resnet):
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    run("teacher", "import", str(tmp_path / "resnet.pth"), "--arch", "tv:resnet18", "--classes", "cat,dog,bird",
        "--image-size", "32", "--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.25", "--out", str(tmp_path / "teacher.pt"))
    _, info = load_teacher(tmp_path / "teacher.pt")
    assert info.mean == [0.5, 0.4, 0.3] and info.std == [0.2, 0.2, 0.25]


@pytest.mark.parametrize("options,message", [
    ([], "give the normalisation the model was trained with"),
    (["--norm", "imagenet", "--mean", "0.5,0.5,0.5"], "not both"),
    (["--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375"], "in [0, 1] units"),
    (["--mean", "0.5,0.5", "--std", "0.5,0.5"], "mean has 2 values for 3 channel(s)"),
])
def test_import_command_normalisation_errors(tmp_path, options, message):
    with pytest.raises(ValueError) as caught:
        run("teacher", "import", "w.pt", "--arch", "tv:resnet18", "--classes", "a,b", "--image-size", "32",
            "--out", str(tmp_path / "teacher.pt"), *options)
    assert message in str(caught.value)


def test_every_teacher_option_has_help():
    teacher = parser()._subparsers._group_actions[0].choices["teacher"]
    for command in teacher._subparsers._group_actions[0].choices.values():
        for action in command._actions:
            assert action.help, f"{command.prog} {action.dest} has no help"


def test_classes_from_a_text_file_a_json_list_or_commas(tmp_path):
    (tmp_path / "classes.txt").write_text("  cat \ndog\n\nbird\n")
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog", "bird"]))
    assert parse_classes(str(tmp_path / "classes.txt")) == CLASSES
    assert parse_classes(str(tmp_path / "classes.json")) == CLASSES
    assert parse_classes("cat, dog,bird") == CLASSES
    with pytest.raises(ValueError, match="dog appear"):
        parse_classes("cat,dog,dog")
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        parse_classes(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.json").write_text(json.dumps({"cat": 0}))
    with pytest.raises(ValueError, match="must hold a list of class names"):
        parse_classes(str(tmp_path / "bad.json"))


def test_a_head_that_ignores_the_class_names_is_refused(tmp_path, monkeypatch):
    from kd3.models import create_model, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register_model("kd3_test_ten_always")
    def ten_always(num_classes=10, in_channels=1, image_size=28, **kwargs):  # a user factory that drops num_classes
        return create_model("lenet5_half", 10, in_channels, image_size)

    state = create_model("kd3_test_ten_always").state_dict()
    grey = Preprocessing(28, 1, (0.5,), (0.25,), CLASSES)
    with pytest.raises(ValueError, match="kd3_test_ten_always's head has 10 outputs but 3 class names were given"):
        import_teacher(state, "kd3_test_ten_always", grey, tmp_path / "teacher.pt")
    assert nothing_written(tmp_path)
