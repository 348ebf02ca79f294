"""Ship a trained model: TorchScript (always) and ONNX (with the onnx extra), with kd3 metadata."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

META_NAME = "kd3.json"


def export_torchscript(model: nn.Module, example: torch.Tensor, meta: dict[str, Any], path: Path) -> Path:
    """Trace the model in eval mode; the metadata (normalisation, classes, shape) travels inside the file."""
    model = model.eval().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    # TorchScript is deprecated in favour of torch.export, but it is still what every runtime loads.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.trace(model, example.cpu())
        torch.jit.save(scripted, str(path), _extra_files={META_NAME: json.dumps(meta)})
    return path


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The module and its kd3 metadata. TorchScript is a program, not data: loading one runs what
    its author compiled into it. kd3 never loads a ``.ts`` on its own initiative, only the one the
    user names (``kd3 eval model.ts``, a run directory's ``student.ts``), so load only files you trust."""
    extra = {META_NAME: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[META_NAME] or "{}")


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    try:
        import onnx  # noqa: F401  (torch.onnx needs it to write the file)
    except ImportError as error:
        raise RuntimeError("ONNX export needs the onnx extra: pip install 'kd3[onnx]'") from error
    model = model.eval().cpu()
    with warnings.catch_warnings():  # the legacy exporter is the one that takes a TorchScript module
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "no signature found", UserWarning)  # a ScriptModule has none; harmless
        torch.onnx.export(model, (example.cpu(),), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path
