"""Readers for the on-disk formats labelled sources ship in; each returns uint8 N×C×H×W + int64 N.

These read the files directly instead of going through ``torchvision.datasets`` so that a root
in torchvision's layout works without torchvision's MD5 checks (slow on big files, and they
reject the tiny stand-in files the tests and CI use), and so imagenet32 (which torchvision
has no class for) shares one code path with the rest.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from kd3.utils.safe_load import UnsafeFileError, read_npz, restricted_pickle

# CIFAR and downsampled ImageNet store each image as 3072 bytes: the R plane, then G, then B.
_PLANES = (3, 32, 32)
_BATCH = "CIFAR / ImageNet32 batch"


def find_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` or its ``.gz`` twin, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Decode an idx file (the MNIST / Fashion-MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {magic:#010x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(f"{path} holds {len(raw) - offset} bytes of data, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{images_path} and {labels_path} do not form an N×H×W / N pair")
    return images[:, None].copy(), labels


def _unpickle(path: Path, what: str) -> dict:
    # Never pickle.load: a planted data_batch_1 would run code. Only arrays and plain values load.
    batch = restricted_pickle(path, what)
    if not isinstance(batch, dict):
        raise UnsafeFileError(f"{path} holds a {type(batch).__name__}, not the dict {what}s hold")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def read_planar_batches(
    paths: list[Path], label_key: str, label_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR-style batches: dicts with 'data' (N×3072 uint8) and a label list.

    Accepts pickles (CIFAR, ImageNet32) and ``.npz`` files with the same keys (ImageNet32's
    npz release); ``label_offset`` turns ImageNet32's 1-based labels into 0-based ones.
    """
    images, labels = [], []
    for path in paths:
        if path.suffix == ".npz":
            batch = read_npz(path, _BATCH)
        else:
            batch = _unpickle(path, _BATCH)
        data = np.asarray(batch["data"], dtype=np.uint8)
        images.append(data.reshape(len(data), *_PLANES))
        labels.append(np.asarray(batch[label_key], dtype=np.int64) - label_offset)
    return np.concatenate(images), np.concatenate(labels)


def read_meta_names(path: Path, key: str) -> list[str]:
    """Class names from a CIFAR ``batches.meta`` / ``meta`` pickle."""
    return [str(n) for n in _unpickle(path, "CIFAR meta file")[key]]


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode SVHN's ``*_32x32.mat``: X is H×W×C×N, y uses 10 for the digit 0."""
    from scipy.io import loadmat  # scipy comes with scikit-learn; only SVHN needs it

    mat = loadmat(str(path))
    images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)
    labels = mat["y"].astype(np.int64).reshape(-1) % 10
    return images, labels
