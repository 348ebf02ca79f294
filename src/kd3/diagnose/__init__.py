"""``kd3 data diagnose``: how a teacher sees a pool before any distillation.

Writes PNGs plus ``summary.md`` and ``summary.html`` to one folder: the teacher's predicted-class
histogram overall and per source, its confidence and entropy per source and style, and, where the
pool has provenance, every relevance score's AUROC (overall, per irrelevant source, per relevant
style), precision / recall at 30 / 50 / 70 % kept, and what each score would keep per class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kd3.data.augment import Normalizer
from kd3.data.pool import Pool
from kd3.diagnose.analysis import Diagnosis, analyse
from kd3.diagnose.plots import write_plots
from kd3.diagnose.report import write_report
from kd3.scores import DEFAULT_SCORE, available_scores, cached_teacher_outputs, compute_score, fitted, resolve
from kd3.scores.share import relative_density
from kd3.teacher import load_teacher

# Reported next to the default: the calibration's pick and issue 6's default (the default's seed), to
# check their figures.
REFERENCE_SCORES = ("minrank:feature_norm+bn_meanlogvar_late", fitted.SEED_SCORE)


@dataclass
class DiagnosisFiles:
    diagnosis: Diagnosis
    markdown: Path
    html: Path
    images: list[Path]


def diagnose(pool: Pool, teacher_path: Path, out: Path, cache_dir: Path, title: str,
             extra_scores: list[str] = (), device: str = "cpu", batch_size: int = 1024,
             show_progress: bool = False) -> DiagnosisFiles:
    """Score ``pool`` with the teacher (one pass, cached under ``cache_dir``) and write the report to ``out``."""
    teacher, info = load_teacher(teacher_path)
    teacher.to(device)
    outputs = cached_teacher_outputs(pool, teacher, Normalizer(tuple(info.mean), tuple(info.std)), cache_dir,
                                     batch_size, torch.device(device), show_progress)
    names = available_scores(outputs) + [resolve(n) for n in (DEFAULT_SCORE, *REFERENCE_SCORES, *extra_scores)]
    if not outputs.bn_layers:
        names = [n for n in names if "bn_" not in n]  # combinations need their BatchNorm components too
    diagnosis = analyse(pool, outputs, info.classes, list(dict.fromkeys(names)), resolve(DEFAULT_SCORE), title)
    if outputs.bn_grid is not None and outputs.bn_grid.shape[1]:
        diagnosis.estimated_share = relative_density(outputs, compute_score(fitted.SEED_SCORE, outputs)).share
    out.mkdir(parents=True, exist_ok=True)
    images = write_plots(diagnosis, out)
    header = [f"Pool: {title}, {len(pool)} images, provenance: {'yes' if diagnosis.aurocs else 'no'}.",
              f"Teacher: `{teacher_path}` ({info.arch}, trained on {info.data}, test accuracy "
              f"{100 * info.test_accuracy:.2f} %, sha256 {info.sha256[:12]}).",
              f"kd3's default relevance score: `{diagnosis.default_score}`."]
    if diagnosis.estimated_share is not None:
        truth = f"; provenance says {diagnosis.relevant.mean():.3f}" if diagnosis.aurocs else ""
        header.append(f"Estimated relevant share: {diagnosis.estimated_share:.3f} of the pool (images whose density ratio "
                      f"favours the relevant fit, `kd3.scores.share.relative_density`; it under-estimates mostly-clean "
                      f"pools and over-estimates pools that are almost all junk{truth}).")
    markdown, page = write_report(diagnosis, out, header, images)
    return DiagnosisFiles(diagnosis, markdown, page, images)
