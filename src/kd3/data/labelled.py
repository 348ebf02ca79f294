"""Labelled images wherever kd3 names a dataset: a built-in ``SOURCE:SPLIT`` or the user's own.

``load_labelled(spec, ...)`` reads

- a directory in torchvision's ImageFolder layout: one sub-folder per class (classes are the
  sorted sub-folder names), images anywhere below it; hidden files and folders are ignored;
- a ``.csv`` of ``path,label`` rows (a header row is optional, paths are relative to the CSV's
  folder, a label is a class name or an integer index; further columns are ignored);
- a ``.npz`` with ``images`` (N×H×W, N×H×W×C or N×C×H×W; uint8, or float in [0, 1]), ``labels``
  and, optionally, ``classes`` (the names, in label order);
- anything else as ``kd3.data.sources.load_source`` does.

Own image files are decoded by ingest's decoder (``kd3.data.ingest.decode_paths``), so a labelled
folder and a pool ingested from the same files hold the same pixels; ``.npz`` arrays that need
another size or channel count go through the same decoder (each image as a lossless PNG).
"""
from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kd3.data.decode import DEFAULT_ALPHA, check_alpha, try_decode
from kd3.data.ingest import IMAGE_EXTENSIONS, check_geometry, decode_paths
from kd3.data.sources import LabelledData, channel_stats, load_source
from kd3.utils.progress import progress
from kd3.utils.safe_load import read_npz

Token = str | int  # an image's label as the data gives it: a class name, or an index
SHOWN_CLASSES = 20  # class names an error lists before "... (N in all)"
_INDEX = re.compile(r"\d+")


def own_data_kind(spec: str) -> str | None:
    """``"folder"``, ``"csv"`` or ``"npz"`` when ``spec`` names the user's own labelled images; None
    for anything else (a built-in ``SOURCE:SPLIT``)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    return {".csv": "csv", ".npz": "npz"}.get(path.suffix.lower())


def load_labelled(spec: str, image_size: int | None = None, channels: int | None = None,
                  classes: Sequence[str] | None = None, *, show_progress: bool = False,
                  alpha: str = DEFAULT_ALPHA) -> LabelledData:
    """The labelled images ``spec`` names (see the module docstring), uint8 N×C×H×W.

    Own images are converted to ``channels``×``image_size``×``image_size`` (both required for a
    folder or CSV; a ``.npz`` keeps its own when they are None); files that do not decode are
    skipped, counted in one line on stderr. ``classes`` (a model's class names, in logit order)
    maps the data's class names onto them by name (an integer label is an index into them) and
    the result has those classes. mean/std are the loaded images' own. ``alpha``: the background
    transparent pixels of own image files are composited onto, as ``kd3 data ingest --alpha``
    (``kd3.data.decode.ALPHA_BACKGROUNDS``; default white).

    A built-in ``SOURCE:SPLIT`` is returned as ``load_source`` gives it, whatever ``image_size``
    and ``channels`` say (the caller's shape check names the mismatch); with ``classes`` its labels
    are renumbered when all its class names are among them, else left as they are.
    """
    check_alpha(alpha)
    kind = own_data_kind(spec)
    if kind is None:
        if ":" not in spec:
            raise FileNotFoundError(f"{spec}: no such folder, .csv or .npz, and not a SOURCE:SPLIT "
                                    "(give a class-folder directory, a path,label .csv, an .npz, or e.g. fashion-mnist:test)")
        data = load_source(spec)
        return data if classes is None else _renumbered(data, list(classes))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{spec} does not exist (give a class-folder directory, a path,label .csv or an .npz)")
    if kind == "npz":
        images, tokens, own = _read_npz(path, image_size, channels, show_progress)
    else:
        if not image_size or not channels:
            raise ValueError(f"{spec} holds image files of any size: say what to decode them to with image_size=N "
                             "and channels=1 (grey) or 3 (RGB)")
        check_geometry(image_size, channels)
        files, tokens, own = _folder(path) if kind == "folder" else _csv(path)
        images, tokens = _decode(spec, files, tokens, image_size, channels, show_progress, alpha)
    labels, names = _indices(tokens, own, None if classes is None else list(classes), spec)
    mean, std = channel_stats(images)
    return LabelledData(images=torch.from_numpy(images), labels=torch.from_numpy(labels), classes=names,
                        mean=mean, std=std)


# -- what the data says ----------------------------------------------------------------------------
def _folder(root: Path) -> tuple[list[str], list[Token], list[str]]:
    """ImageFolder: (image files, their class folder's name, every class folder's name, sorted)."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ValueError(f"{root} has no class sub-folders: lay it out as {root}/<class name>/<images> "
                         "(or list path,label rows in a .csv)")
    files: list[str] = []
    tokens: list[Token] = []
    for name in names:
        for path in sorted((root / name).rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(root / name).parts)
            if not hidden and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                files.append(str(path))
                tokens.append(name)
    if not files:
        raise ValueError(f"no image files in the class folders of {root} "
                         f"(extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files, tokens, names


def _csv(path: Path) -> tuple[list[str], list[Token], None]:
    """``path,label`` rows: (image files, relative to the CSV's folder; their labels; no class list)."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        rows = [(line, row) for line, row in enumerate(csv.reader(f), 1) if any(cell.strip() for cell in row)]
    if rows and _is_header(rows[0][1], path.parent):
        rows = rows[1:]
    files: list[str] = []
    tokens: list[Token] = []
    for line, row in rows:
        if len(row) < 2 or not row[1].strip():
            raise ValueError(f"{path}, line {line}: {','.join(row)!r} is not a path,label row")
        files.append(str(path.parent / row[0].strip()))
        label = row[1].strip()
        tokens.append(int(label) if _INDEX.fullmatch(label) else label)
    if not files:
        raise ValueError(f"{path} lists no images: write one path,label row per image")
    return files, tokens, None


def _is_header(row: list[str], folder: Path) -> bool:
    # A header names columns ("path,label"); a first data row names an image file, present or not.
    first = row[0].strip()
    return Path(first).suffix.lower() not in IMAGE_EXTENSIONS and not (folder / first).is_file()


def _read_npz(path: Path, image_size: int | None, channels: int | None,
              show_progress: bool) -> tuple[np.ndarray, list[Token], list[str] | None]:
    arrays = read_npz(path, "labelled .npz")
    missing = [key for key in ("images", "labels") if key not in arrays]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(missing)} array (it has {', '.join(arrays) or 'none'}); "
                         "save images (N×H×W, N×H×W×C or N×C×H×W) and labels with numpy.savez")
    images, labels = _as_nchw(arrays["images"], path), arrays["labels"]
    if not len(images):
        raise ValueError(f"{path} holds no images")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be {len(images)} integers, one per image (got {labels.dtype} "
                         f"{labels.shape})")
    own = [str(name) for name in arrays["classes"].tolist()] if "classes" in arrays else None
    if own is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(own)):
        raise ValueError(f"{path}: labels run from {labels.min()} to {labels.max()} but classes names {len(own)}")
    tokens: list[Token] = [own[i] for i in labels.tolist()] if own is not None else labels.tolist()
    c, h, w = images.shape[1:]
    size, chans = image_size or h, channels or c
    if (chans, size, size) != (c, h, w):
        check_geometry(size, chans)
        images = _redecode(images, size, chans, show_progress)
    return images, tokens, own


def _as_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    """uint8 N×C×H×W from N×H×W, N×H×W×C or N×C×H×W, uint8 (or integers in 0..255) or floats in [0, 1]."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{path}: images of shape {images.shape} are not N×H×W, N×H×W×C or N×C×H×W "
                         "with 1 or 3 channels")
    if np.issubdtype(images.dtype, np.floating):
        if images.size and not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
            raise ValueError(f"{path}: float images must lie in [0, 1] (these run from {images.min()} to "
                             f"{images.max()}); save uint8 0..255 or divide by 255")
        images = np.rint(images * 255)
    elif not np.issubdtype(images.dtype, np.integer) or (images.size and (images.min() < 0 or images.max() > 255)):
        raise ValueError(f"{path}: images must be uint8 (0..255) or floats in [0, 1], got {images.dtype}")
    return np.ascontiguousarray(images, dtype=np.uint8)


def _redecode(images: np.ndarray, size: int, channels: int, show_progress: bool) -> np.ndarray:
    """Each image through ingest's decoder (as a lossless PNG): the same resize and conversion as a file's."""
    out = np.empty((len(images), channels, size, size), dtype=np.uint8)
    for i in progress(range(len(images)), desc="convert", enabled=show_progress, total=len(images), unit="image"):
        buffer = io.BytesIO()
        Image.fromarray(images[i, 0] if images.shape[1] == 1 else images[i].transpose(1, 2, 0)).save(
            buffer, format="PNG", compress_level=1)
        out[i], _ = try_decode(buffer.getvalue(), size, channels)  # a PNG kd3 just wrote always decodes
    return out


def _decode(spec: str, files: list[str], tokens: list[Token], size: int, channels: int,
            show_progress: bool, alpha: str) -> tuple[np.ndarray, list[Token]]:
    """The readable images and their labels; the unreadable ones counted in one stderr line."""
    images, bad = decode_paths(files, size, channels, show_progress=show_progress, desc=f"decode {spec}", alpha=alpha)
    if not len(images):
        raise ValueError(f"no readable image in {spec}: none of its {len(files)} files decodes "
                         f"(first: {bad[0][0]}: {bad[0][1]})")
    if bad:
        print(f"{spec}: skipped {len(bad)} of {len(files)} image files that do not decode "
              f"(first: {bad[0][0]}: {bad[0][1]})", file=sys.stderr)
        unreadable = {path for path, _ in bad}  # a path that fails once fails every time it is listed
        tokens = [t for f, t in zip(files, tokens) if f not in unreadable]
    return images, tokens


# -- labels ------------------------------------------------------------------------------------------
def _indices(tokens: list[Token], own: list[str] | None, target: list[str] | None,
             spec: str) -> tuple[np.ndarray, list[str]]:
    """int64 labels and the class names they index: ``target``'s when given, else the data's own."""
    if target is not None:
        lookup = {name: i for i, name in enumerate(target)}
        codes = {t: _target_index(t, lookup, target, spec) for t in set(tokens)}
        return np.array([codes[t] for t in tokens], dtype=np.int64), target
    if own is None:
        kinds = {type(t) for t in tokens}
        if kinds == {int}:
            own = [str(i) for i in range(max(tokens) + 1)]
            return np.array(tokens, dtype=np.int64), own
        if kinds != {str}:
            raise ValueError(f"{spec} mixes class names and integer labels: give every label as a name, or every "
                             "one as an index")
        own = sorted(set(tokens))
    lookup = {name: i for i, name in enumerate(own)}
    return np.array([lookup[t] for t in tokens], dtype=np.int64), own


def _target_index(token: Token, lookup: dict[str, int], target: list[str], spec: str) -> int:
    if isinstance(token, str) and token in lookup:
        return lookup[token]
    index = token if isinstance(token, int) else int(token) if _INDEX.fullmatch(token) else None
    if index is not None and 0 <= index < len(target):
        return index
    shown = ", ".join(target[:SHOWN_CLASSES]) + (f", ... ({len(target)} in all)" if len(target) > SHOWN_CLASSES else "")
    what = f"label index {token}" if isinstance(token, int) else f"class {token!r}"
    raise ValueError(f"{spec}: {what} is not one of the model's classes ({shown}); name classes as the model "
                     f"does, or give indices 0..{len(target) - 1}")


def _renumbered(data: LabelledData, target: list[str]) -> LabelledData:
    """A built-in source's labels as indices into ``target``, when every one of its names is there."""
    if data.classes == target or not set(data.classes) <= set(target):
        return data
    mapping = torch.tensor([target.index(name) for name in data.classes], dtype=torch.int64)
    return replace(data, labels=mapping[data.labels], classes=list(target))
