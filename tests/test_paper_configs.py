"""The paper's configs (ResNet-34 -> ResNet-18, CIFAR teacher, ImageNet 32×32 pool) run a few steps
on tiny stand-in files in the real formats, so they keep working for users with a GPU."""
import json

import numpy as np
import pytest

from kd3.cli import main
from standins import write_cifar10, write_cifar100, write_imagenet32

SMALL = ["train.epochs=1", "train.batch_size=16", "train.amp=false", "train.channels_last=false", "progress=false"]


@pytest.mark.parametrize("dataset, writer", [("cifar10", write_cifar10), ("cifar100", write_cifar100)])
def test_paper_config_runs_on_standin_data(dataset, writer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KD3_DATA_ROOT", str(tmp_path / "data"))
    rng = np.random.default_rng(0)
    writer(tmp_path / "data", 8 if dataset == "cifar10" else 40, rng)
    write_imagenet32(tmp_path / "data", per_batch=4, rng=rng)
    teacher = tmp_path / "teacher.pt"
    assert main(["train-teacher", f"configs/paper/teacher-{dataset}-resnet34.yaml", f"output={teacher}",
                 f"output_dir={tmp_path / 'runs'}", *SMALL]) == 0
    out = tmp_path / "distill"
    assert main(["distill", f"configs/paper/{dataset}-resnet34-resnet18.yaml", f"teacher.checkpoint={teacher}",
                 f"output_dir={out}", *SMALL]) == 0
    (run_dir,) = out.iterdir()
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["train_images"] > 0 and "loss_wfa" in record and 0.0 <= record["test_acc"] <= 1.0
    assert (run_dir / "student.ts").stat().st_size > 0
    # The exported deployable (backbone + projector + the teacher's classifier) scores what training logged.
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", f"{dataset}:test"]) == 0
    assert f"{100 * record['test_acc']:.2f}" in capsys.readouterr().out
