"""kd3: knowledge distillation from webly collected images without the original training data.

The Python API, importable from ``kd3`` (loaded on first use, so ``import kd3`` stays instant)::

    import kd3
    path, info = kd3.import_teacher("resnet18.pth", "tv:resnet18",
                                    kd3.Preprocessing(32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), classes),
                                    "teacher.pt")
    pool, report = kd3.ingest("my_images/", size=32, channels=3, out="pool/")
    result = kd3.distill("recommended", overrides=["teacher.checkpoint=teacher.pt", "pool.path=pool/"])
    files = kd3.export(result.run_dir)                       # student.ts, student.pt2, student.onnx
    print(kd3.evaluate(result.run_dir / "student.onnx", "my_labelled/").accuracy)

Each name's docstring says what it takes and returns; ``examples/distill_own_model.py`` walks the path.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "distill": ("kd3.api", "distill"),
    "train_teacher": ("kd3.api", "train_teacher"),
    "evaluate": ("kd3.api", "evaluate_file"),
    "export": ("kd3.export_cli", "export"),
    "import_teacher": ("kd3.teacher_import", "import_teacher"),
    "ingest": ("kd3.data.ingest", "ingest"),
    "distill_config": ("kd3.api", "distill_config"),
    "load_labelled": ("kd3.data.labelled", "load_labelled"),
    "load_model_file": ("kd3.shipped", "load_model_file"),
    "load_teacher": ("kd3.teacher", "load_teacher"),
    "Preprocessing": ("kd3.preprocessing", "Preprocessing"),
    "TeacherInfo": ("kd3.teacher", "TeacherInfo"),
    "DistillConfig": ("kd3.config", "DistillConfig"),
    "TeacherTrainConfig": ("kd3.config", "TeacherTrainConfig"),
    "register_model": ("kd3.models", "register_model"),
    "create_model": ("kd3.models", "create_model"),
    "list_models": ("kd3.models", "list_models"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'kd3' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
