"""Tiny stand-in files in the real formats of user-provided datasets (CIFAR, ImageNet 32×32)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def planar_batch(n: int, rng: np.random.Generator) -> np.ndarray:
    """n images whose R plane is 200, G 100, B random: checks the plane order is decoded."""
    data = np.empty((n, 3, 32, 32), dtype=np.uint8)
    data[:, 0], data[:, 1] = 200, 100
    data[:, 2] = rng.integers(0, 256, size=(n, 32, 32))
    return data.reshape(n, 3072)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int, rng: np.random.Generator) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(folder / name, {b"data": planar_batch(per_batch, rng), b"labels": [i % 10 for i in range(per_batch)]})
    _pickle(folder / "batches.meta", {b"label_names": [f"c{i}" for i in range(10)]})


def write_cifar100(root: Path, per_split: int, rng: np.random.Generator) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ["train", "test"]:
        _pickle(folder / name, {b"data": planar_batch(per_split, rng), b"fine_labels": [i % 100 for i in range(per_split)]})
    _pickle(folder / "meta", {b"fine_label_names": [f"f{i}" for i in range(100)]})


def write_imagenet32(root: Path, per_batch: int, rng: np.random.Generator, npz: bool = False) -> None:
    folder = root / "Imagenet32_train"  # the archive's own sub-folder
    folder.mkdir(parents=True)
    for name in [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]:
        labels = np.array([1, 2, 3, 1000, 7] * (per_batch // 5 + 1))[:per_batch]
        if npz:
            np.savez(folder / f"{name}.npz", data=planar_batch(per_batch, rng), labels=labels)
        else:
            _pickle(folder / name, {"data": planar_batch(per_batch, rng), "labels": labels.tolist()})


def write_teacher(path: Path, arch: str = "lenet5_half_bn", num_classes: int = 10, in_channels: int = 1,
                  image_size: int = 28, data: str = "uci-digits:train") -> Path:
    """An untrained kd3 teacher checkpoint (random weights, a genuine record): for tests that need
    the file, not its accuracy."""
    import torch

    from kd3.models import create_model
    from kd3.teacher import TeacherInfo, save_teacher

    torch.manual_seed(0)
    net = create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    info = TeacherInfo(arch=arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                       classes=[f"c{i}" for i in range(num_classes)], mean=[0.5] * in_channels,
                       std=[0.25] * in_channels, data=data, test_accuracy=0.0, val_accuracy=0.0)
    save_teacher(path, net, info)
    return path


def write_digits_inputs(root: Path) -> None:
    """An untrained 1×28×28 10-class teacher and a 64-image UCI-digits file pool under ``root``."""
    from kd3.data.pool import Pool
    from kd3.data.sources import load_source

    write_teacher(root / "teacher.pt")
    Pool.unlabelled(load_source("uci-digits:train").images[:64], origin="folder").save(root / "pool.npz")


def digits_distill_args(root: Path, *overrides: str) -> list[str]:
    """``kd3 distill`` arguments of a one-epoch run on ``write_digits_inputs(root)`` (seconds)."""
    return ["distill", "configs/digits-wild/blind_kd.yaml", f"teacher.checkpoint={root / 'teacher.pt'}", "teacher.recipe=",
            "pool.name=file", f"pool.path={root / 'pool.npz'}", "eval_data=uci-digits:test", "train.epochs=1",
            "train.batch_size=32", "progress=false", f"output_dir={root / 'runs'}", *overrides]
