"""Load any model file kd3 writes and run it the same way: uint8 images in, logits out.

``load_model_file`` reads a run directory (its ``student.ts``), a student ``.ts`` (TorchScript),
``.pt2`` (torch.export) or ``.onnx`` (run by onnxruntime on the CPU), or a kd3 teacher checkpoint
``.pt``. Whatever the file, ``ShippedModel.predict`` takes uint8 N×C×H×W images (RGB, or grey for
C = 1, values 0-255, at ``preprocessing.image_size``) and returns logits N×num_classes: the
contract of ``kd3.engine.export.INPUT_FORMAT``. Where the file does not normalise inside (a teacher
``.pt``; a legacy ``.ts``, written by a kd3 that shipped no preprocessing and so no ``input_format``),
the normalisation is applied outside, from the file's own metadata, so every file evaluates correctly.

A ``.ts`` or ``.pt2`` is a program: loading one runs what its author compiled into it. Load only
files you trust (kd3 loads one only where the user names it). A teacher ``.pt`` loads with
``weights_only=True``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from kd3.engine import faults
from kd3.engine.evaluate import EvalResult, evaluate
from kd3.engine.export import INPUT_FORMAT, META_FIELDS, ShippedClassifier, load_program, load_torchscript, meta_from_onnx
from kd3.preprocessing import Preprocessing
from kd3.teacher import load_teacher

KINDS = {".ts": "torchscript", ".pt2": "export", ".onnx": "onnx", ".pt": "teacher"}
# What a legacy .ts (before input_format) already carried; every newer file carries META_FIELDS.
_PREPROCESSING_FIELDS = ("mean", "std", "classes", "in_channels", "image_size")


class ShippedModel(nn.Module):
    """A classifier read from a kd3 file: ``predict(uint8 images) -> logits``, whatever the format.

    ``preprocessing`` is what the file says about its input; ``meta`` its kd3 metadata (for a
    teacher, its record); ``kind`` one of ``KINDS``' values; ``runner`` the uint8-in module.
    An ``nn.Module`` so that ``.to(device)`` moves it and ``kd3.engine.evaluate`` runs it."""

    def __init__(self, path: Path, kind: str, runner: nn.Module, preprocessing: Preprocessing, meta: dict[str, Any]):
        super().__init__()
        self.path, self.kind, self.preprocessing, self.meta = path, kind, preprocessing, meta
        self.runner = runner

    def train(self, mode: bool = True) -> ShippedModel:
        """Only the flag: a loaded file is fixed in inference mode (and a torch.export module refuses ``.eval()``)."""
        self.training = mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits N×num_classes of uint8 N×C×H×W images (0-255, RGB or grey)."""
        p = self.preprocessing
        expected = (p.in_channels, p.image_size, p.image_size)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{self.path} takes uint8 images N×{'×'.join(map(str, expected))} (0-255), "
                             f"got {images.dtype} {tuple(images.shape)}; decode images to uint8 without normalising")
        return self.runner(images)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu") -> EvalResult:
        """Accuracy (± SE) and loss on uint8 images, by ``kd3.engine.evaluate.evaluate`` fed the
        uint8 batches as they are (the file normalises, or this wrapper does for it)."""
        device = torch.device(device)
        return evaluate(self.to(device), images, labels, _as_is, device)  # type: ignore[arg-type]


def _as_is(images: torch.Tensor) -> torch.Tensor:
    return images


def _first_line(error: BaseException) -> str:
    """The first sentence of a loader's message: torch's go on with paragraphs of advice."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(". ")[0].rstrip(".")[:200]


def _preprocessing(path: Path, meta: dict[str, Any], required: tuple[str, ...]) -> Preprocessing:
    missing = [key for key in required if key not in meta]
    if missing:
        older = (", or an older kd3's .onnx (write it again with `kd3 export RUN_DIR --format onnx`)"
                 if path.suffix == ".onnx" else "")
        raise ValueError(f"{path} has no kd3 metadata ({', '.join(missing)} missing): not a model kd3 exported{older}")
    try:
        return Preprocessing(int(meta["image_size"]), int(meta["in_channels"]), tuple(meta["mean"]), tuple(meta["std"]),
                             tuple(meta["classes"]))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its kd3 metadata does not fit: {_first_line(error)}") from None


def _runner(path: Path, module: nn.Module, meta: dict[str, Any], preprocessing: Preprocessing) -> nn.Module:
    """The uint8-in module: the file's own, or, for a legacy ``.ts`` (no input_format: it took
    normalised floats), the module behind the normalisation its metadata records."""
    if "input_format" not in meta:
        return ShippedClassifier(module, preprocessing)
    if meta["input_format"] != INPUT_FORMAT:
        raise ValueError(f"{path} takes input_format={meta['input_format']!r}, which this kd3 does not know "
                         f"(it knows {INPUT_FORMAT!r}); read it with the kd3 that wrote it ({meta.get('kd3_version')})")
    return module


def _load_torchscript(path: Path) -> ShippedModel:
    try:
        module, meta = load_torchscript(path)
    except (RuntimeError, ValueError, OSError) as error:  # torch.jit.load: RuntimeError; a corrupt kd3.json: ValueError
        raise ValueError(f"{path} is not a TorchScript file kd3 can read ({_first_line(error)})") from None
    legacy = "input_format" not in meta
    preprocessing = _preprocessing(path, meta, _PREPROCESSING_FIELDS if legacy else META_FIELDS)
    return ShippedModel(path, "torchscript", _runner(path, module, meta, preprocessing), preprocessing, meta)


class _ProgramRunner(nn.Module):
    """A torch.export program as a module. Its graph asserts the device it was exported on (the
    CPU), so it is moved (``move_to_device_pass``) to the device of the images it is given."""

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        self.program = program
        self.by_device: dict[torch.device, nn.Module] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.device not in self.by_device:
            # The pass rewrites the program it is given: a copy, so the CPU one stays as it is.
            program = self.program if images.device.type == "cpu" else move_to_device_pass(copy.deepcopy(self.program),
                                                                                              images.device)
            self.by_device[images.device] = program.module()
        return self.by_device[images.device](images)


def _load_program(path: Path) -> ShippedModel:
    try:
        program, meta = load_program(path)
    except Exception as error:  # torch.export.load raises many types (zip, serde, json) for one cause: not a .pt2
        raise ValueError(f"{path} is not a torch.export file kd3 can read ({type(error).__name__}: {_first_line(error)})") from None
    preprocessing = _preprocessing(path, meta, META_FIELDS)
    return ShippedModel(path, "export", _runner(path, _ProgramRunner(program), meta, preprocessing), preprocessing, meta)


class _OnnxRunner(nn.Module):
    """An onnxruntime session (CPU) as a module: tensors in on any device, logits back on it."""

    def __init__(self, session: Any):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: images.cpu().numpy()})
        return torch.from_numpy(logits).to(images.device)


def _load_onnx(path: Path) -> ShippedModel:
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(f"{path}: running ONNX needs onnxruntime: pip install 'kd3[onnx]'") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) share no public base
        raise ValueError(f"{path} is not an ONNX model onnxruntime can read ({_first_line(error)})") from None
    try:
        meta = meta_from_onnx(dict(session.get_modelmeta().custom_metadata_map))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: its kd3 metadata is not JSON ({_first_line(error)})") from None
    preprocessing = _preprocessing(path, meta, META_FIELDS)
    return ShippedModel(path, "onnx", _runner(path, _OnnxRunner(session), meta, preprocessing), preprocessing, meta)


def _load_teacher(path: Path) -> ShippedModel:
    net, info = load_teacher(path)
    preprocessing = info.preprocessing
    # A teacher is a bare Net on normalised floats: its normalisation is applied here, outside.
    return ShippedModel(path, "teacher", ShippedClassifier(net, preprocessing), preprocessing, dict(vars(info)))


def load_model_file(path: Path | str) -> ShippedModel:
    """Any model file kd3 writes, ready for ``predict(uint8 images)``: a finished run directory
    (its ``student.ts``), a ``.ts``, ``.pt2``, ``.onnx`` or a teacher ``.pt``. A missing file raises
    ``FileNotFoundError``; a foreign or damaged one, or one without kd3 metadata, a one-line ``ValueError``."""
    path = Path(path)
    if path.is_dir():
        faults.raise_if_failed(path)  # a failed run: say why it has no student
        path = path / "student.ts"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (give a teacher .pt, a student .ts/.pt2/.onnx "
                                "or a finished run directory)")
    kind = KINDS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: kd3 reads .ts (TorchScript), .pt2 (torch.export), .onnx and teacher .pt files, "
                         f"not {path.suffix or 'a file without a suffix'}")
    loader = {"torchscript": _load_torchscript, "export": _load_program, "onnx": _load_onnx, "teacher": _load_teacher}[kind]
    return loader(path)
