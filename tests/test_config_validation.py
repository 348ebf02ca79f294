"""Bad configurations fail before any long work: one line naming the problem, exit code 2, and
nothing built or trained (no run directory, no teacher, no pool cache)."""
import numpy as np
import pytest
import torch

from kd3.cli import main
from kd3.data.pool import Pool
from standins import digits_distill_args, write_cifar10, write_digits_inputs, write_teacher


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """An untrained 1×28×28, 10-class teacher, a file pool of UCI digits, and a private cache."""
    monkeypatch.setenv("KD3_CACHE", str(tmp_path / "cache"))
    write_digits_inputs(tmp_path)
    return tmp_path



def fails(capsys, argv, *expected):
    """main(argv) exits 2 with one line on stderr that holds every expected fragment; returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in expected:
        assert fragment in err, err
    return err


# --- numbers and choices ---------------------------------------------------------------------------

@pytest.mark.parametrize("override,expected", [
    ("train.lr=-0.1", "train.lr: must be > 0, got -0.1"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
    ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
    ("train.batch_size=0", "train.batch_size: must be an integer ≥ 1, got 0"),
    ("train.batch_size=2.5", "train.batch_size: expected int, got 2.5"),
    ("train.epochs=0", "train.epochs: must be an integer ≥ 1, got 0"),
    ("train.momentum=1.0", "train.momentum: must be in [0, 1), got 1.0"),
    ("train.weight_decay=-0.001", "train.weight_decay: must be ≥ 0, got -0.001"),
    ("train.gamma=0", "train.gamma: must be > 0, got 0.0"),
    ("train.schedule=linear", "train.schedule: must be one of step, cosine, got 'linear'"),
    ("train.milestones=[0.5,1.5]", "train.milestones: must be in [0, 1], got [0.5, 1.5]"),
    ("train.eval_every=0", "train.eval_every: must be an integer ≥ 1, got 0"),
    ("train.epoch_steps=-1", "train.epoch_steps: must be an integer ≥ 0, got -1"),
    ("train.logger=wandb", "train.logger: must be one of jsonl, tensorboard, got 'wandb'"),
    ("augment.padding=-2", "augment.padding: must be an integer ≥ 0, got -2"),
    ("pool.irrelevant_fraction=1.5", "pool.irrelevant_fraction: must be in [0, 1], got 1.5"),
    ("pool.size=0", "pool.size: must be an integer ≥ 1, got 0"),
    ("method.temperature=.inf", "method.temperature: must be a finite number, got inf"),
])
def test_out_of_range_numbers(setup, capsys, override, expected):
    fails(capsys, digits_distill_args(setup, override), "kd3 distill: error: ", expected)
    assert not (setup / "runs").exists()


def test_train_teacher_numbers_are_checked_too(tmp_path, capsys):
    fails(capsys, ["train-teacher", "configs/teachers/mnist5k-lenet5_bn.yaml", "train.lr=-1",
                   f"output_dir={tmp_path / 'runs'}"], "train.lr: must be > 0, got -1.0")
    assert not (tmp_path / "runs").exists()


# --- the YAML files ----------------------------------------------------------------------------------

def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntrain:\n  epochs: [3, 4\n  lr: 0.1\n")
    err = fails(capsys, ["distill", str(path)], f"{path}: YAML syntax error at line 4, column 5:")
    assert "expected ',' or ']', but got ':' (while parsing a flow sequence at line 3, column 11)" in err


def test_base_cycle_names_the_chain(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: a.yaml\n")
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    fails(capsys, ["distill", str(a)], f"the 'base' chain loops: {a} -> {b} -> {c} -> {a}")


def test_missing_base_names_the_file_that_wants_it(tmp_path, capsys):
    (tmp_path / "child.yaml").write_text("base: gone.yaml\n")
    fails(capsys, ["distill", str(tmp_path / "child.yaml")],
          f"config file {tmp_path / 'gone.yaml'} does not exist (the base of {tmp_path / 'child.yaml'})")


# --- names -------------------------------------------------------------------------------------------

def test_unknown_student_architecture_lists_the_known_ones(setup, capsys):
    fails(capsys, digits_distill_args(setup, "student=resnet9000"),
          "student='resnet9000' is not a known architecture; known: ", "lenet5_half_bn", "resnet18")
    assert not (setup / "runs").exists()


def test_unknown_method_lists_the_known_ones(setup, capsys):
    fails(capsys, digits_distill_args(setup, "method.name=kd4"), "unknown method 'kd4'; valid methods: ", "blind_kd", "kd3")


def test_unknown_pool_and_variant(setup, capsys):
    fails(capsys, digits_distill_args(setup, "pool.name=fashion-tame"),
          "pool.name='fashion-tame' is not a pool; known: fashion-wild, digits-wild, file (with pool.path) or source")
    fails(capsys, digits_distill_args(setup, "pool.name=digits-wild", "pool.variant=hard"),
          "pool: digits-wild has no variant 'hard'; known: default")
    assert not (setup / "cache" / "pools").exists()


def test_bad_device(setup, capsys):
    fails(capsys, digits_distill_args(setup, "train.device=banana"), "train.device='banana' is not a device")
    if not torch.cuda.is_available():
        fails(capsys, digits_distill_args(setup, "train.device=cuda"), "CUDA is not available on this machine")


def test_train_teacher_unknown_model(tmp_path, capsys):
    fails(capsys, ["train-teacher", "configs/teachers/mnist5k-lenet5_bn.yaml", "model=lenet6",
                   f"output_dir={tmp_path / 'runs'}"], "model='lenet6' is not a known architecture")
    assert not (tmp_path / "runs").exists()


# --- teacher, pool and eval data that do not fit ------------------------------------------------------

def test_eval_data_with_other_classes_than_the_teacher(setup, capsys):
    write_teacher(setup / "five.pt", num_classes=5)
    fails(capsys, digits_distill_args(setup, f"teacher.checkpoint={setup / 'five.pt'}"),
          "eval_data=uci-digits:test has 10 classes but the teacher ", "five.pt predicts 5")


def test_eval_data_of_another_size_than_the_teacher(setup, capsys):
    write_teacher(setup / "rgb.pt", in_channels=3, image_size=32)
    fails(capsys, digits_distill_args(setup, f"teacher.checkpoint={setup / 'rgb.pt'}"),
          "eval_data=uci-digits:test images are 1×28×28 (C×H×W) but the teacher ", "rgb.pt takes 3×32×32")


def test_pool_of_another_size_than_the_teacher(setup, capsys):
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    Pool.unlabelled(images, origin="folder").save(setup / "rgb-pool.npz")
    fails(capsys, digits_distill_args(setup, f"pool.path={setup / 'rgb-pool.npz'}"),
          f"pool.path={setup / 'rgb-pool.npz'} images are 3×32×32 (C×H×W) but the teacher", "takes 1×28×28")
    assert not (setup / "runs").exists()


def test_builder_pool_that_cannot_fit_the_teacher_is_refused_before_it_is_built(setup, capsys, monkeypatch):
    write_cifar10(setup / "data", 10, np.random.default_rng(0))
    monkeypatch.setenv("KD3_DATA_ROOT", str(setup / "data"))
    write_teacher(setup / "rgb.pt", in_channels=3, image_size=32)
    fails(capsys, digits_distill_args(setup, f"teacher.checkpoint={setup / 'rgb.pt'}", "pool.name=fashion-wild",
                               "eval_data=cifar10:test"),
          "pool.name=fashion-wild images are 1×28×28 (C×H×W) but the teacher", "takes 3×32×32")
    assert not (setup / "cache" / "pools").exists()


def test_empty_pool(setup, capsys):
    Pool.unlabelled(torch.zeros(0, 1, 28, 28, dtype=torch.uint8), origin="folder").save(setup / "empty.npz")
    fails(capsys, digits_distill_args(setup, f"pool.path={setup / 'empty.npz'}"),
          f"pool.path={setup / 'empty.npz'} holds no images: nothing to distil on")


def test_missing_pool_file(setup, capsys):
    fails(capsys, digits_distill_args(setup, f"pool.path={setup / 'nope.npz'}"), f"pool.path={setup / 'nope.npz'} does not exist")


def test_teacher_recipe_that_cannot_fit_is_refused_before_training(setup, capsys, monkeypatch):
    """The teacher is missing and would be trained from its recipe (minutes): the eval split's size
    is checked against the recipe's data first, and no teacher is trained."""
    write_cifar10(setup / "data", 10, np.random.default_rng(0))
    monkeypatch.setenv("KD3_DATA_ROOT", str(setup / "data"))
    missing = setup / "cache" / "teachers" / "mnist5k-lenet5_bn.pt"  # the recipe's own cache entry: trainable
    fails(capsys, digits_distill_args(setup, "teacher.checkpoint={cache}/teachers/mnist5k-lenet5_bn.pt",
                                      "teacher.recipe=configs/teachers/mnist5k-lenet5_bn.yaml",
                               "eval_data=cifar10:test"),
          "eval_data=cifar10:test images are 3×32×32 (C×H×W) but the teacher configs/teachers/mnist5k-lenet5_bn.yaml trains")
    assert not missing.exists() and not (setup / "runs").exists()


def test_teacher_recipe_with_unknown_model_is_refused_before_training(setup, capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: lenet6\ndata: uci-digits:train\noutput: {setup / 'to-train.pt'}\n")
    fails(capsys, digits_distill_args(setup, f"teacher.checkpoint={setup / 'to-train.pt'}", f"teacher.recipe={recipe}"),
          f"{recipe}: model='lenet6' is not a known architecture")
    assert not (setup / "to-train.pt").exists()


def test_a_misspelt_teacher_checkpoint_is_an_error_not_a_freshly_trained_teacher(setup, capsys):
    """The preset's recipe would train a LeNet into the user's filename and distil from it: instead the
    missing file is named, exit 2, and nothing is trained or created."""
    typo = setup / "my-teacher.ptt"
    line = fails(capsys, digits_distill_args(setup, f"teacher.checkpoint={typo}",
                                             "teacher.recipe=configs/teachers/mnist5k-lenet5_bn.yaml"),
                 f"teacher.checkpoint={typo}: {typo} does not exist", "nothing was trained")
    assert "mnist5k-lenet5_bn.pt" in line  # says which file the recipe would have trained
    assert not typo.exists() and not (setup / "runs").exists() and not (setup / "cache" / "teachers").exists()


def test_missing_dataset_is_one_line_not_a_traceback(setup, capsys, monkeypatch):
    monkeypatch.setenv("KD3_DATA_ROOT", str(setup / "no-data-here"))
    fails(capsys, digits_distill_args(setup, "eval_data=cifar10:test"), "cifar10: cifar-10-batches-py/", "not found under")


def test_kd3_eval_on_a_split_with_other_classes(setup, capsys):
    write_teacher(setup / "five.pt", num_classes=5)
    fails(capsys, ["eval", str(setup / "five.pt"), "--data", "uci-digits:test"],
          "kd3 eval: error: uci-digits:test has 10 classes but the model predicts 5")


def test_train_teacher_splits_must_agree(tmp_path, capsys, monkeypatch):
    write_cifar10(tmp_path / "data", 10, np.random.default_rng(0))
    monkeypatch.setenv("KD3_DATA_ROOT", str(tmp_path / "data"))
    fails(capsys, ["train-teacher", "configs/teachers/mnist5k-lenet5_bn.yaml", "data=uci-digits:train",
                   "val_data=uci-digits:test", "test_data=cifar10:test", f"output_dir={tmp_path / 'runs'}"],
          "test_data=cifar10:test images are 3×32×32 (C×H×W) but the teacher trained on data=uci-digits:train takes 1×28×28")


def test_tensorboard_logger_without_the_package(setup, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an install without tensorboard sees
    fails(capsys, digits_distill_args(setup, "train.logger=tensorboard"),
          "train.logger=tensorboard needs the tensorboard package: pip install 'kd3[tensorboard]'")
    assert not (setup / "runs").exists()


def test_a_good_config_still_runs(setup, capsys):
    assert main(digits_distill_args(setup)) == 0
    (run_dir,) = (setup / "runs").iterdir()
    assert (run_dir / "student.ts").is_file()
