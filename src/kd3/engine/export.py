"""Ship a trained classifier: TorchScript, torch.export and ONNX files that each take raw images.

The contract every file kd3 exports keeps (``INPUT_FORMAT``): the model takes **uint8** images,
N×C×H×W, RGB (grey when C = 1), at the teacher's image size, values 0-255, and returns logits
N×num_classes. The ``/255`` and the per-channel ``(x - mean) / std`` are inside the graph
(``ShippedClassifier``), so a user feeds decoded images as they are. The batch size is free.

Each file carries kd3's metadata (``META_FIELDS``): TorchScript and torch.export as the JSON extra
file ``kd3.json``, ONNX as ``metadata_props`` (``onnx_metadata``). ``kd3.shipped`` reads all of them.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kd3
from kd3.engine import faults
from kd3.preprocessing import Preprocessing

META_NAME = "kd3.json"
INPUT_FORMAT = "uint8 NxCxHxW 0-255 RGB (grey if C=1), normalised inside"
META_FIELDS = ("mean", "std", "classes", "in_channels", "image_size", "input_format", "kd3_version", "teacher_sha256", "method")
# ONNX metadata values are strings: these hold JSON (lists, integers), the others plain text.
_ONNX_JSON_FIELDS = ("mean", "std", "classes", "in_channels", "image_size")
# format name -> the file it writes in a run directory
FILES = {"torchscript": "student.ts", "export": "student.pt2", "onnx": "student.onnx"}


class ShippedClassifier(nn.Module):
    """``net`` behind its own preprocessing: uint8 N×C×H×W (0-255) in, logits out.

    ``mean``/``std`` are buffers, so they travel inside every exported graph; the arithmetic is
    ``kd3.data.augment.Normalizer``'s, operation for operation, so the logits equal training's."""

    def __init__(self, net: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() / 255.0 - self.mean) / self.std)


def shipped_meta(preprocessing: Preprocessing, method: str, teacher_sha256: str) -> dict[str, Any]:
    """The metadata every exported file carries (``META_FIELDS``)."""
    return {"mean": list(preprocessing.mean), "std": list(preprocessing.std), "classes": list(preprocessing.classes),
            "in_channels": preprocessing.in_channels, "image_size": preprocessing.image_size,
            "input_format": INPUT_FORMAT, "kd3_version": kd3.__version__, "teacher_sha256": teacher_sha256,
            "method": method}


def example_input(meta: dict[str, Any], batch: int = 2) -> torch.Tensor:
    """A blank uint8 batch of the contract's shape. Two images, not one: torch.export would
    otherwise specialise the batch dimension to 1."""
    return torch.zeros(batch, meta["in_channels"], meta["image_size"], meta["image_size"], dtype=torch.uint8)


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' deprecation notes concern torch's own future, not the user's model (a
    TracerWarning about the model itself still shows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "no signature found", UserWarning)  # ONNX of a ScriptModule: harmless
        yield


def trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The model in eval mode, traced to TorchScript on the CPU (a ScriptModule is returned as it is)."""
    if isinstance(model, torch.jit.ScriptModule):
        return model
    # TorchScript is deprecated in favour of torch.export, but it is still what most runtimes load.
    with torch.no_grad(), _quiet():
        return torch.jit.trace(model.eval().cpu(), example.cpu())


class InputCheck(nn.Module):
    """The traced ``shipped`` model behind a check of its input, compiled with ``torch.jit.script`` so the
    check stays in the ``.ts`` (tracing would keep only the branch taken): a float batch (already /255 or
    normalised by habit) or one of another shape is refused instead of giving wrong logits."""

    def __init__(self, shipped: torch.jit.ScriptModule, channels: int, size: int):
        super().__init__()
        self.shipped = shipped
        self.channels = channels
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError("kd3 student: give uint8 images, 0-255 (the normalisation is inside the model), "
                             "not floats already scaled or normalised")
        if images.dim() != 4 or images.size(1) != self.channels or images.size(2) != self.size or images.size(3) != self.size:
            raise ValueError("kd3 student: give images as N x C x H x W at the channels and size in the file's kd3.json")
        return self.shipped(images)


def unchecked(module: nn.Module) -> nn.Module:
    """The model inside an ``InputCheck`` (loaded from a ``.ts`` or not), for exporters that cannot take its
    control flow (ONNX, whose typed uint8 input refuses floats by itself); other modules as they are."""
    return module.shipped if hasattr(module, "shipped") else module


def export_torchscript(model: nn.Module, example: torch.Tensor, meta: dict[str, Any], path: Path) -> Path:
    """Trace the model in eval mode; a model under kd3's uint8 contract gets its ``InputCheck``. The
    metadata travels inside the file as ``kd3.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = trace(unchecked(model), example)
    if meta.get("input_format") == INPUT_FORMAT:
        scripted = torch.jit.script(InputCheck(scripted, meta["in_channels"], meta["image_size"]))
    with _quiet():
        torch.jit.save(scripted, str(path), _extra_files={META_NAME: json.dumps(meta)})
    return path


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The module and its kd3 metadata. TorchScript is a program, not data: loading one runs what
    its author compiled into it. kd3 never loads a ``.ts`` on its own initiative, only the one the
    user names (``kd3 eval model.ts``, a run directory's ``student.ts``), so load only files you trust."""
    extra = {META_NAME: ""}
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[META_NAME] or "{}")


def export_program(model: nn.Module, example: torch.Tensor, meta: dict[str, Any], path: Path) -> Path:
    """``torch.export`` (TorchScript's successor) with a dynamic batch dimension, saved with
    ``torch.export.save``; the metadata travels as the extra file ``kd3.json``. ``model`` must be
    eager PyTorch: torch.export takes no ScriptModule, and traces through one inside a module
    only at the batch size it was traced with."""
    model = model.eval().cpu()
    with _quiet():
        program = torch.export.export(model, (example.cpu(),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                                      strict=False)
    with open(path, "wb") as handle:  # a handle: torch.export.save warns about any file name not ending in .pt2
        torch.export.save(program, handle, extra_files={META_NAME: json.dumps(meta)})
    return path


def load_program(path: Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The program in a ``.pt2`` written by ``export_program`` and its kd3 metadata. Like a ``.ts``,
    load only files you trust."""
    extra = {META_NAME: ""}
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.ERROR)  # on a file it cannot read, torch.export.load logs a traceback before it raises
    try:
        with _quiet():
            program = torch.export.load(path, extra_files=extra)
    finally:
        log.setLevel(level)
    return program, json.loads(extra[META_NAME] or "{}")


def onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """kd3's metadata as ONNX ``metadata_props`` (strings): mean, std, classes, in_channels and
    image_size as JSON, the rest as plain text."""
    return {key: json.dumps(value) if key in _ONNX_JSON_FIELDS else str(value) for key, value in meta.items()}


def meta_from_onnx(props: dict[str, str]) -> dict[str, Any]:
    """The inverse of ``onnx_metadata``."""
    return {key: json.loads(value) if key in _ONNX_JSON_FIELDS else value for key, value in props.items()}


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: dict[str, Any] | None = None) -> Path:
    """ONNX (opset of the legacy exporter, dynamic batch) with ``meta`` as ``metadata_props``.
    Needs the onnx package (the ``kd3[onnx]`` extra)."""
    try:
        import onnx
    except ImportError as error:
        raise RuntimeError("ONNX export needs the onnx extra: pip install 'kd3[onnx]'") from error
    model = unchecked(model).eval().cpu()
    with _quiet():  # the legacy exporter is the one that takes a TorchScript module (torch's dynamo one needs onnxscript)
        torch.onnx.export(model, (example.cpu(),), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    if meta:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, onnx_metadata(meta))
        onnx.save(proto, str(path))
    return path


def onnx_available() -> bool:
    """Whether ``export_onnx`` can run (the onnx package is importable)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _staged(path: Path, kept: str) -> Iterator[Path]:
    """A temp name beside ``path``, renamed over it once written whole; a failed write leaves
    neither half a file nor the temp file, and an OSError becomes one line (``faults.WriteFailed``)."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with faults.writing(path, kept):
            yield staged
            os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def _write(fmt: str, model: nn.Module, example: torch.Tensor, meta: dict[str, Any], path: Path) -> None:
    if fmt == "torchscript":
        export_torchscript(model, example, meta, path)
    elif fmt == "export":
        export_program(model, example, meta, path)
    else:
        export_onnx(model, example, path, meta)


def ship(model: nn.Module, meta: dict[str, Any], directory: Path, formats: Sequence[str], kept: str = "",
         strict: bool = False) -> tuple[list[Path], list[str]]:
    """Write ``model`` (uint8 in, logits out: a ``ShippedClassifier`` or a loaded shipped file) in
    each of ``formats`` (keys of ``FILES``) into ``directory``, each file whole or not at all.

    Returns the files written and one line for each format skipped: ONNX without the onnx
    package, or a model torch.export or the ONNX exporter cannot convert. With ``strict`` (the
    user asked for those formats by name) a skip raises ``ValueError`` instead. TorchScript is
    never skipped: it is the file every run delivers, so its failure fails the delivery."""
    written, notes = [], []
    example = example_input(meta)
    for fmt in formats:
        path = directory / FILES[fmt]
        if fmt == "onnx" and not onnx_available():
            notes.append(f"{path.name} not written: the onnx package is missing (pip install 'kd3[onnx]', "
                         f"then `kd3 export {directory} --format onnx`)")
            continue
        try:
            with _staged(path, kept) as staged:
                _write(fmt, model, example, meta, staged)
        except faults.WriteFailed:
            raise  # the disk, not the model: never a note
        except Exception as error:  # torch.export and torch.onnx raise many types for one cause: code they cannot convert
            if fmt == "torchscript":
                raise
            exporter = "torch.export" if fmt == "export" else "the ONNX exporter"
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            notes.append(f"{path.name} not written: {exporter} cannot convert this model "
                         f"({type(error).__name__}: {first_line}); student.ts is unaffected")
            continue
        written.append(path)
    if strict and notes:
        raise ValueError("; ".join(notes))
    return written, notes
