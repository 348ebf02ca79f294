"""End to end through the ``kd3`` command on UCI digits (offline, small): train a teacher,
round-trip its checkpoint, distil from a file pool, evaluate and export the student."""
import json

import pytest
import torch

from kd3.cli import main
from kd3.data.pool import Pool
from kd3.data.sources import load_source
from kd3.engine.export import load_torchscript


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def teacher_path(workdir):
    path = workdir / "teacher.pt"
    code = main(["train-teacher", "configs/teachers/mnist5k-lenet5_bn.yaml", "model=lenet5_half_bn",
                 "data=uci-digits:train", "val_data=uci-digits:test", "test_data=uci-digits:test",
                 f"output={path}", f"output_dir={workdir / 'runs'}", "train.epochs=2", "progress=false"])
    assert code == 0
    return path


def test_teacher_checkpoint_round_trips_with_weights_only(teacher_path):
    from kd3.teacher import load_teacher

    record = torch.load(teacher_path, weights_only=True)
    info = record["info"]
    assert info["arch"] == "lenet5_half_bn" and info["num_classes"] == 10 and len(info["classes"]) == 10
    assert info["in_channels"] == 1 and info["image_size"] == 28 and len(info["sha256"]) == 64
    assert info["recipe"]["train"]["epochs"] == 2 and 0.0 <= info["test_accuracy"] <= 1.0
    net, loaded = load_teacher(teacher_path)
    assert loaded.sha256 == info["sha256"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, record["state_dict"][key])
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_tampered_teacher_is_refused(teacher_path, tmp_path):
    from kd3.teacher import load_teacher

    record = torch.load(teacher_path, weights_only=True)
    first = next(iter(record["state_dict"]))
    record["state_dict"][first] = record["state_dict"][first] + 1
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="checksum"):
        load_teacher(tmp_path / "bad.pt")


def test_eval_teacher_prints_accuracy(teacher_path, capsys):
    assert main(["eval", str(teacher_path), "--data", "uci-digits:test"]) == 0
    assert "uci-digits:test" in capsys.readouterr().out


def test_distill_eval_export_from_file_pool(teacher_path, workdir, capsys):
    images = load_source("uci-digits:train").images
    Pool.unlabelled(images, origin="folder").save(workdir / "pool.npz")
    out = workdir / "distill"
    code = main(["distill", "configs/digits-wild/blind_kd.yaml", f"teacher.checkpoint={teacher_path}",
                 "teacher.recipe=", "pool.name=file", f"pool.path={workdir / 'pool.npz'}", "eval_data=uci-digits:test",
                 "train.epochs=2", "train.batch_size=64", f"output_dir={out}", "progress=false"])
    assert code == 0
    (run_dir,) = out.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "selection" not in records[0]  # no provenance
    module, meta = load_torchscript(run_dir / "student.ts")
    assert meta["method"] == "blind_kd" and meta["image_size"] == 28
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", "uci-digits:test"]) == 0
    printed = capsys.readouterr().out
    assert f"{100 * records[-1]['test_acc']:.2f}" in printed  # eval reproduces the logged accuracy
    pytest.importorskip("onnx")
    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    assert (run_dir / "student.onnx").stat().st_size > 0


def test_config_error_names_key(capsys):
    assert main(["distill", "configs/fashion-wild/blind_kd.yaml", "train.epochz=3"]) == 2
    assert "train.epochz" in capsys.readouterr().err
