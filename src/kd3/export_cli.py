"""``kd3 export``: the run's deployable student as TorchScript (already written) and/or ONNX."""
from __future__ import annotations

from pathlib import Path

from kd3.engine.export import export_onnx, load_torchscript
from kd3.engine.faults import raise_if_failed


def export_run(run_dir: Path, fmt: str) -> list[Path]:
    raise_if_failed(run_dir)  # a diverged run has a student.FAILED note instead
    scripted_path = run_dir / "student.ts"
    if not scripted_path.is_file():
        raise FileNotFoundError(f"{scripted_path} does not exist: the run has not finished "
                                f"(continue it with `kd3 distill --resume {run_dir}`)")
    written = [scripted_path] if fmt in ("torchscript", "all") else []
    if fmt in ("onnx", "all"):
        import torch

        module, meta = load_torchscript(scripted_path)
        example = torch.zeros(1, meta["in_channels"], meta["image_size"], meta["image_size"])
        written.append(export_onnx(module, example, run_dir / "student.onnx"))
    return written
