"""The CLI a practitioner expects: presets by name from anywhere (and inside the wheel), `kd3 --version`,
`kd3 config show/list`, "did you mean", options and overrides in any order, help on every argument."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import kd3
from kd3 import api
from kd3.cli import build_parser, main
from kd3.config import PRESETS_DIR, DistillConfig, TeacherTrainConfig, from_dict, load_config, preset_names, to_dict
from kd3.models import create_model, list_models

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a directory outside the repository, where configs/... relative paths do not exist."""
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "configs").exists()
    return tmp_path


def show(capsys, *args: str) -> str:
    assert main(["config", "show", *args]) == 0
    return capsys.readouterr().out


def test_version_names_kd3_torch_and_torchvision(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kd3 {kd3.__version__} (")
    assert f"torch {version('torch')}" in out and f"torchvision {version('torchvision')}" in out


def test_config_show_prints_the_config_a_run_would_use(elsewhere, capsys):
    overrides = ["train.epochs=3", "student=resnet8"]
    out = show(capsys, "fashion-wild/recommended", *overrides)
    expected = load_config(DistillConfig, PRESETS_DIR / "fashion-wild" / "recommended.yaml", overrides)
    assert yaml.safe_load(out) == to_dict(expected)
    assert from_dict(DistillConfig, yaml.safe_load(out)) == expected
    assert expected.train.epochs == 3 and expected.student == "resnet8"  # the overrides were applied, not dropped
    assert expected.method["score"] == "bn_grid_maha"  # and the preset's base chain was followed


def test_presets_resolve_by_name_outside_the_repository(elsewhere, capsys):
    teacher = yaml.safe_load(show(capsys, "teachers/fashion-lenet5_bn"))  # a train-teacher config, told by its keys
    assert teacher == to_dict(load_config(TeacherTrainConfig, PRESETS_DIR / "teachers" / "fashion-lenet5_bn.yaml"))
    assert teacher["model"] == "lenet5_bn"
    # How presets name their teacher recipe (and bench specs their rows): a repo-relative configs/ path.
    recipe = load_config(DistillConfig, "fashion-wild/recommended.yaml").teacher.recipe
    assert recipe == "configs/teachers/fashion-lenet5_bn.yaml" and not Path(recipe).exists()
    assert load_config(TeacherTrainConfig, recipe) == load_config(TeacherTrainConfig, "teachers/fashion-lenet5_bn")
    # An existing file comes first: a local recommended.yaml shadows the preset of that name, "recommended" does not.
    (elsewhere / "recommended.yaml").write_text("student: resnet8\n")
    assert yaml.safe_load(show(capsys, "recommended.yaml"))["student"] == "resnet8"
    assert yaml.safe_load(show(capsys, "recommended"))["student"] == "mobilenetv2"


def test_recommended_preset_is_the_recipe_for_your_own_teacher_and_pool():
    cfg = load_config(DistillConfig, "recommended")
    recipe = load_config(DistillConfig, "fashion-wild/recommended")
    assert cfg.method == recipe.method == {"name": "dfnd", "budget": "relative_density", "per_class": True,
                                           "favoured_only": True, "score": "bn_grid_maha", "temperature": 4.0, "noise_weight": 1.0,
                                           "teacher_views": 8}
    assert cfg.train.warmup_epochs == recipe.train.warmup_epochs == 1
    assert (cfg.pool.name, cfg.pool.path, cfg.eval_data, cfg.teacher.checkpoint, cfg.teacher.recipe) == ("file", "", "", "", "")
    assert cfg.student in list_models()
    for channels, size in [(1, 28), (3, 32), (3, 96)]:  # any input size and channel count
        student = create_model(cfg.student, num_classes=7, in_channels=channels, image_size=size).eval()
        assert student(torch.zeros(2, channels, size, size)).shape == (2, 7)
    head = (PRESETS_DIR / "recommended.yaml").read_text().split("\nname:")[0]
    assert all(key in head for key in ("teacher.checkpoint=", "pool.path=", "student", "eval_data"))


def test_config_list_names_every_preset_with_its_first_comment(capsys):
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line for line in lines[1:] if line.strip() and not line[0].isdigit()}
    names = preset_names()
    assert sorted(listed) == names == sorted(p.relative_to(PRESETS_DIR).with_suffix("").as_posix()
                                             for p in PRESETS_DIR.rglob("*.yaml"))
    first_comment = (PRESETS_DIR / "recommended.yaml").read_text().splitlines()[0].lstrip("# ")
    assert listed["recommended"].split()[1] == "distill" and listed["recommended"].endswith(first_comment)
    assert listed["teachers/fashion-lenet5_bn"].split()[1] == "train-teacher"
    assert listed["bench/fashion-wild"].split()[1] == "bench"


def test_misspelt_command_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["distil", "fashion-wild/recommended"])
    assert stop.value.code == 2
    assert "did you mean 'distill'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["data", "lisst"])
    assert stop.value.code == 2
    assert "did you mean 'list'?" in capsys.readouterr().err


@pytest.mark.parametrize("args, suggestion", [
    (["config", "show", "fashion-wild/recomended"], "did you mean fashion-wild/recommended?"),
    (["distill", "fashion-wild-recommended.yaml"], "did you mean fashion-wild/recommended?"),
    (["train-teacher", "teachers/fashion-lenet5"], "did you mean teachers/fashion-lenet5_bn?"),
    (["config", "show", "recommended", "train.epoch=3"], "did you mean 'train.epochs'?"),
    (["distill", "recommended", "pool.pth=x.npz"], "did you mean 'pool.path'?"),
    (["config", "show", "recommended", "epochs=3"], "did you mean 'train.epochs'?"),  # one section too high
])
def test_misspelt_preset_or_key_suggests_the_right_name(elsewhere, capsys, args, suggestion):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert suggestion in err and len(err.strip().splitlines()) == 1


def test_options_and_overrides_in_any_order(monkeypatch, capsys):
    parser = build_parser()
    for argv in (["distill", "fashion-wild/recommended", "--nproc", "2", "train.epochs=1"],
                 ["distill", "--nproc", "2", "fashion-wild/recommended", "train.epochs=1"],
                 ["distill", "fashion-wild/recommended", "train.epochs=1", "--nproc=2"]):
        args = parser.parse_args(argv)
        assert (args.config, args.nproc, args.overrides) == ("fashion-wild/recommended", 2, ["train.epochs=1"])
    args = parser.parse_args(["train-teacher", "teachers/fashion-lenet5_bn", "train.epochs=1", "--import", "m1"])
    assert (args.config, args.overrides, args.imports_after) == ("teachers/fashion-lenet5_bn", ["train.epochs=1"], ["m1"])
    args = parser.parse_args(["config", "show", "recommended", "--as", "distill", "train.epochs=2", "student=resnet8"])
    assert (args.config, args.kind, args.overrides) == ("recommended", "distill", ["train.epochs=2", "student=resnet8"])
    args = parser.parse_args(["demo", "train.epochs=1", "--config", "demo", "student=resnet8"])
    assert (args.config, args.overrides) == ("demo", ["train.epochs=1", "student=resnet8"])
    with pytest.raises(SystemExit):
        parser.parse_args(["train-teacher"])
    assert capsys.readouterr().err.strip().endswith("required: config")  # overrides stay optional when intermixed

    calls = []

    class Launcher:  # kd3's launcher process, as kd3.cli._relaunch_with_torchrun starts it: finished at once
        pid = -1

        def __init__(self, command: list[str], **kwargs: object) -> None:
            calls.append(command)

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Launcher)
    monkeypatch.setattr("kd3.models.plugins.load_plugins", lambda modules: None)  # m0 is only carried along
    assert main(["--import", "m0", "distill", "fashion-wild/recommended", "--nproc", "2", "train.epochs=1"]) == 0
    (command,) = calls  # relaunched once under torchrun, with everything typed except --nproc 2
    assert command[command.index("kd3") + 1:] == ["--import", "m0", "distill", "fashion-wild/recommended", "train.epochs=1"]
    assert "--nproc_per_node=2" in command


def test_import_modules_load_before_the_command_runs(monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr("kd3.models.plugins.load_plugins", lambda modules: loaded.append(list(modules)))
    assert main(["--import", "a", "--import", "b", "config", "list", "--import", "c"]) == 0
    assert loaded == [["a", "b", "c"]]
    assert main(["config", "list"]) == 0
    assert loaded[-1] == []  # called without --import too: installed entry points load


def test_demo_runs_the_packaged_presets_from_any_directory(elsewhere, monkeypatch, capsys):
    seen = []

    def distill(cfg):
        seen.append(cfg)
        return SimpleNamespace(history=[{}], accuracy=0.5, accuracy_se=0.01, images_seen=1, wall_time=0.1, run_dir=Path("r"))

    monkeypatch.setattr(api, "distill", distill)
    monkeypatch.setattr(api, "prepare_teacher", lambda cfg: (None, SimpleNamespace(arch="t", data="d", test_accuracy=0.9)))
    assert main(["demo", "train.epochs=1"]) == 0
    assert [c.name for c in seen] == ["fashion-wild-blind_kd", "fashion-wild-kd3", "fashion-wild-recommended"]
    assert all(c.train.epochs == 1 and c.output_dir == "runs/demo" for c in seen)


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Every argument, sub-command group and sub-command without help text, named by its command path."""
    missing = []
    for action in parser._actions:
        if not action.help:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            for name, child in action.choices.items():
                if name not in helped:
                    missing.append(f"{path} {name} (the command itself)")
                missing += _walk(child, f"{path} {name}")
    return missing


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"distill", "train-teacher", "config", "data", "bench", "report", "demo"} <= set(commands)
    assert _walk(parser, "kd3") == []


def test_the_wheel_ships_the_presets(tmp_path):
    pytest.importorskip("setuptools")
    project = tmp_path / "project"  # a copy, so the build writes nothing (build/, egg-info) into the working tree
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "whl"),
                    str(project)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "whl").glob("kd3-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("kd3/configs/") and n.endswith(".yaml")}
    assert shipped == {f"kd3/configs/{name}.yaml" for name in preset_names()}
    assert {"kd3/configs/recommended.yaml", "kd3/configs/teachers/fashion-lenet5_bn.yaml"} <= shipped
