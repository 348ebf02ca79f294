"""The README demo: distil on the default fashion-wild pool with each configured method and
print teacher and student accuracies side by side."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kd3 import api
from kd3.config import PRESETS_DIR, DistillConfig, load_config
from kd3.engine.logging import print_table


@dataclass
class DemoConfig:
    # Config files or preset names; the presets' "configs/..." paths resolve from the package in any directory.
    runs: list[str] = field(default_factory=lambda: ["configs/fashion-wild/blind_kd.yaml",
                                                     "configs/fashion-wild/kd3.yaml",
                                                     "configs/fashion-wild/recommended.yaml"])
    overrides: list[str] = field(default_factory=list)


def run(config_path: str | None, overrides: list[str]) -> None:
    """Distil with each of the demo config's runs (default: the packaged demo preset) and print one table."""
    demo = load_config(DemoConfig, config_path or PRESETS_DIR / "demo.yaml")  # the package's, whatever the directory
    started = time.perf_counter()
    rows, run_dirs = [], []
    teacher_info = None
    for path in demo.runs:
        cfg = load_config(DistillConfig, path, [*demo.overrides, *overrides])
        label = Path(path).stem  # not the method's name: the recommended recipe is a DFND configuration
        print(f"\n== {label}: {cfg.method['name']} ({path}) ==")
        result = api.distill(cfg)
        teacher_info = teacher_info or api.prepare_teacher(cfg)[1]
        last = result.history[-1]
        selection = last.get("selection", {})
        rows.append([label, f"{100 * result.accuracy:.2f} ± {100 * result.accuracy_se:.2f}",
                     f"{selection.get('precision', float('nan')):.3f}", f"{selection.get('recall', float('nan')):.3f}",
                     result.images_seen, f"{result.wall_time:.1f}"])
        run_dirs.append(str(result.run_dir))
    if teacher_info is not None:
        rows.insert(0, [f"teacher ({teacher_info.arch}, {teacher_info.data})", f"{100 * teacher_info.test_accuracy:.2f}",
                        "", "", "", ""])
    print_table("kd3 demo: fashion-wild, last-epoch test accuracy (Fashion-MNIST test, 10k)",
                ["model", "test acc % (±SE)", "sel. precision", "sel. recall", "images seen", "wall s"], rows)
    print("runs (kd3 report RUN_DIR draws their curves and selections):", *run_dirs, sep="\n  ")
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
