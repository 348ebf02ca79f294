"""Labelled sources: shapes, dtypes, split sizes and disjointness, determinism, clear failures."""
from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from kd3.data.sources import DataUnavailable, channel_stats, list_sources, load_source
from standins import write_cifar10, write_imagenet32

AVAILABLE = {s.name for s in list_sources() if s.available}
needs = {name: pytest.mark.skipif(name not in AVAILABLE, reason=f"{name} is not installed "
                                  f"here (see kd3.data.list_sources() for how to get it)")
         for name in ("fashion-mnist", "mnist-5k", "uci-digits")}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def _check_common(data, n: int, shape: tuple[int, ...]) -> None:
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert tuple(data.images.shape) == (n, *shape)
    assert data.labels.shape == (n,) and data.index.shape == (n,)
    assert len(data.classes) == 10
    assert int(data.labels.min()) == 0 and int(data.labels.max()) == 9
    assert len(data.mean) == len(data.std) == shape[0]
    assert all(0 < m < 1 for m in data.mean) and all(0 < s < 1 for s in data.std)


@needs["fashion-mnist"]
def test_fashion_splits_have_documented_sizes_and_are_balanced():
    sizes = {"train": 60000, "test": 10000, "o-train": 27000, "o-val": 3000, "r": 30000}
    splits = {s: load_source(f"fashion-mnist:{s}") for s in sizes}
    for split, n in sizes.items():
        data = splits[split]
        _check_common(data, n, (1, 28, 28))
        assert torch.bincount(data.labels).tolist() == [n // 10] * 10, split
    assert splits["train"].classes[0] == "T-shirt/top"
    train = splits["train"].images
    assert int(train.min()) == 0 and int(train.max()) == 255
    # Derived splits are the train images at the recorded positions...
    for split in ("o-train", "o-val", "r"):
        idx = splits[split].index
        assert torch.equal(splits[split].images, train[idx])
        assert torch.equal(splits[split].labels, splits["train"].labels[idx])
    # ...and O (o-train + o-val) and R partition the train split.
    o_train, o_val, r = (set(splits[s].index.tolist()) for s in ("o-train", "o-val", "r"))
    assert not o_train & o_val and not o_train & r and not o_val & r
    assert o_train | o_val | r == set(range(60000))


@needs["fashion-mnist"]
def test_fashion_statistics_match_the_train_split():
    data = load_source("fashion-mnist:test")  # the published values are hard-coded
    mean, std = channel_stats(load_source("fashion-mnist:train").images.numpy())
    assert data.mean[0] == pytest.approx(mean[0], abs=1e-4)
    assert data.std[0] == pytest.approx(std[0], abs=1e-4)
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)  # and the histogram is exact
    mean, std = channel_stats(x.numpy())
    assert mean == pytest.approx((x.double() / 255).mean((0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx((x.double() / 255).std((0, 2, 3), unbiased=False).tolist(),
                                abs=1e-12)


@needs["fashion-mnist"]
def test_fashion_splits_are_pinned_and_identical_in_another_process():
    # Pinned: if the split ever changed, teachers trained on the old O would see R images.
    r = load_source("fashion-mnist:r").index
    assert _digest(r) == "fdbc3030e11023c1"
    assert _digest(load_source("fashion-mnist:o-val").index) == "34cac9b4e56f0b96"
    code = ("import hashlib; from kd3.data.sources import load_source; "
            "print(hashlib.sha256(load_source('fashion-mnist:r').index.numpy().tobytes())"
            ".hexdigest()[:16])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(r)


@needs["mnist-5k"]
def test_mnist5k_splits():
    sizes = {"train": 4000, "test": 1000, "o-train": 3600, "o-val": 400}
    splits = {s: load_source(f"mnist-5k:{s}") for s in sizes}
    for split, n in sizes.items():
        _check_common(splits[split], n, (1, 28, 28))
        assert torch.bincount(splits[split].labels).tolist() == [n // 10] * 10
    assert int(splits["train"].images.max()) == 255
    train_rows = {bytes(x) for x in splits["train"].images.reshape(4000, -1).numpy()}
    assert not train_rows & {bytes(x) for x in splits["test"].images.reshape(1000, -1).numpy()}
    assert _digest(splits["test"].index) == "702746827e553786"
    assert splits["train"].mean[0] == pytest.approx(0.1310, abs=5e-4)
    with pytest.raises(ValueError, match="no pool half"):
        load_source("mnist-5k:r")


@needs["uci-digits"]
def test_uci_digits_are_framed_like_mnist():
    train, test = load_source("uci-digits:train"), load_source("uci-digits:test")
    _check_common(train, 1438, (1, 28, 28))
    _check_common(test, 359, (1, 28, 28))
    assert int(train.images.max()) == 255
    # 8×8 upsampled into a 20×20 box with a 4-pixel black border, as MNIST frames its digits.
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert int(train.images[:, 0][:, border].max()) == 0
    counts = torch.bincount(test.labels)
    assert counts.sum() == 359 and int(counts.min()) >= 35  # stratified 20%
    assert _digest(test.index) == "28d0e1fd0db0d5dc"
    assert torch.equal(load_source("uci-digits:test").images, test.images)


def test_absent_sources_say_how_to_get_them(tmp_path):
    missing = tmp_path / "nothing-here"
    for spec, hint in [("cifar10:train", "download=True"), ("cifar100:test", "root="),
                       ("svhn:train", "train_32x32.mat"), ("imagenet32:train", "train_data_batch"),
                       ("mnist:train", "MNIST/raw")]:
        with pytest.raises(DataUnavailable, match="root=") as err:
            load_source(spec, root=missing)
        assert hint in str(err.value), spec
    assert "nothing-here" in str(err.value)


def test_bad_specs_are_rejected():
    for spec, msg in [("fashion-mnist", "NAME:SPLIT"), ("nope:train", "unknown source"),
                      ("fashion-mnist:valid", "unknown split")]:
        with pytest.raises(ValueError, match=msg):
            load_source(spec)


def test_list_sources_reports_every_source(tmp_path):
    statuses = {s.name: s for s in list_sources(root=tmp_path)}
    assert set(statuses) >= {"fashion-mnist", "mnist-5k", "mnist", "uci-digits", "cifar10",
                             "cifar100", "svhn", "imagenet32"}
    assert not statuses["cifar10"].available and "download=True" in statuses["cifar10"].detail


# --- user-provided formats, exercised on tiny stand-in files ----------------------------------

def test_cifar10_from_a_torchvision_root(tmp_path):
    write_cifar10(tmp_path, per_batch=20, rng=np.random.default_rng(0))
    train = load_source("cifar10:train", root=tmp_path)
    assert tuple(train.images.shape) == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert int(train.images[:, 0].min()) == 200 and int(train.images[:, 1].max()) == 100
    assert train.classes == [f"c{i}" for i in range(10)] and len(train.mean) == 3
    assert len(load_source("cifar10:test", root=tmp_path)) == 20
    assert len(load_source("cifar10:o-val", root=tmp_path)) == 10
    with pytest.raises(ValueError, match="no pool half"):
        load_source("cifar10:r", root=tmp_path)


@pytest.mark.parametrize("suffix", ["", ".npz"])
def test_imagenet32_pickles_and_npz_with_one_based_labels(tmp_path, suffix):
    write_imagenet32(tmp_path, per_batch=5, rng=np.random.default_rng(0), npz=suffix == ".npz")
    train = load_source("imagenet32:train", root=tmp_path)
    assert tuple(train.images.shape) == (50, 3, 32, 32)
    assert train.labels[:5].tolist() == [0, 1, 2, 999, 6] and len(train.classes) == 1000
    assert int(train.images[:, 0].min()) == 200
    assert len(load_source("imagenet32:test", root=tmp_path)) == 5


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    for split, n in [("train", 12), ("test", 4)]:
        x = np.zeros((32, 32, 3, n), dtype=np.uint8)
        x[:, :16, 0, :] = 255  # left half red: checks the H×W×C×N transpose
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.arange(1, n + 1)[:, None] % 11})
    train = load_source("svhn:train", root=tmp_path)
    assert tuple(train.images.shape) == (12, 3, 32, 32)
    red = train.images[0, 0]
    assert int(red[:, :16].min()) == 255 and int(red[:, 16:].max()) == 0
    assert train.labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 1]  # 10 means the digit 0


def test_mnist_from_gzipped_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in [("train", 30), ("t10k", 10)]:
        images = np.arange(n * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(n, 28, 28)
        header = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write((0x0801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    train = load_source("mnist:train", root=tmp_path)
    assert tuple(train.images.shape) == (30, 1, 28, 28)
    assert train.images.flatten()[:300].tolist() == list(range(256)) + list(range(44))
    assert train.labels.tolist() == [i % 10 for i in range(30)]
    assert len(load_source("mnist:test", root=tmp_path)) == 10
