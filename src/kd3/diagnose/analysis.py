"""Everything the diagnosis reports, as numbers: what the teacher predicts on a pool, how sure it is,
per source and style, and, where the pool has provenance, how well each relevance score finds the
relevant images and what it would keep."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kd3.data.pool import Pool
from kd3.diagnose.metrics import group_aurocs, precision_recall, top_fraction
from kd3.methods.kd3.selection import percentile_select
from kd3.scores import TeacherOutputs, compute_score
from kd3.scores.formulas import entropy

KEEP_FRACTIONS = (0.3, 0.5, 0.7)


@dataclass
class Kept:
    """What a score keeps at one fraction of the pool."""

    per_class: list[int]  # kept images per teacher-predicted class (global top fraction)
    precision: float = float("nan")  # of the global top fraction, against provenance
    recall: float = float("nan")
    percentile_precision: float = float("nan")  # of KD³'s percentile thresholds (per-class top fraction)
    percentile_recall: float = float("nan")


@dataclass
class Diagnosis:
    title: str
    classes: list[str]
    default_score: str
    prediction: np.ndarray  # teacher argmax per image
    confidence: np.ndarray  # teacher max softmax
    entropy: np.ndarray  # teacher softmax entropy (nats)
    source: np.ndarray
    style: np.ndarray
    relevant: np.ndarray
    has_provenance: bool
    scores: dict[str, np.ndarray]  # name -> value per image, higher = more relevant
    aurocs: dict[str, dict[str, float]] = field(default_factory=dict)  # score -> group -> AUROC
    kept: dict[str, dict[float, Kept]] = field(default_factory=dict)  # score -> fraction -> Kept
    # The pool's estimated relevant share (kd3.scores.share.relative_density); None without BatchNorm features
    estimated_share: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def groups(self, by: str) -> list[str]:
        """Source or style names, relevant ones first, then by name."""
        values = self.source if by == "source" else self.style
        names = sorted(set(values.tolist()))
        return sorted(names, key=lambda n: (not self.relevant[values == n].any(), n))


def analyse(pool: Pool, outputs: TeacherOutputs, classes: list[str], score_names: list[str],
            default_score: str, title: str) -> Diagnosis:
    logits = outputs.logits
    confidence, prediction = torch.softmax(logits, dim=1).max(dim=1)
    diagnosis = Diagnosis(
        title=title, classes=classes, default_score=default_score, prediction=prediction.numpy(),
        confidence=confidence.numpy(), entropy=entropy(logits).numpy(), source=pool.source.astype(str),
        style=pool.style.astype(str), relevant=pool.relevant.astype(bool), has_provenance=pool.has_provenance,
        scores={name: compute_score(name, outputs).double().numpy() for name in score_names})
    provenance = diagnosis.has_provenance and diagnosis.relevant.any() and not diagnosis.relevant.all()
    for name, score in diagnosis.scores.items():
        if provenance:
            diagnosis.aurocs[name] = group_aurocs(score, diagnosis.relevant, diagnosis.source, diagnosis.style)
        diagnosis.kept[name] = {f: _kept(diagnosis, score, prediction, f, provenance) for f in KEEP_FRACTIONS}
    return diagnosis


def _kept(diagnosis: Diagnosis, score: np.ndarray, prediction: torch.Tensor, fraction: float,
          provenance: bool) -> Kept:
    mask = top_fraction(score, fraction)
    kept = Kept(per_class=np.bincount(diagnosis.prediction[mask], minlength=diagnosis.num_classes).tolist())
    if provenance:
        kept.precision, kept.recall = precision_recall(mask, diagnosis.relevant)
        chosen = percentile_select(torch.from_numpy(score), prediction, diagnosis.num_classes, fraction).indices
        per_class = np.zeros(len(score), dtype=bool)
        per_class[chosen.numpy()] = True
        kept.percentile_precision, kept.percentile_recall = precision_recall(per_class, diagnosis.relevant)
    return kept


def group_summary(diagnosis: Diagnosis, by: str) -> list[list]:
    """Per source (or style): images, mean confidence, mean entropy, the class most of them are
    predicted as and its share: a class irrelevant images pile into shows up here."""
    values = diagnosis.source if by == "source" else diagnosis.style
    rows = []
    for name in diagnosis.groups(by):
        members = values == name
        counts = np.bincount(diagnosis.prediction[members], minlength=diagnosis.num_classes)
        top = int(counts.argmax())
        relevant = diagnosis.relevant[members]
        known = ("yes" if relevant.all() else "no" if not relevant.any() else "mixed") \
            if diagnosis.has_provenance else "unknown"
        rows.append([name, int(members.sum()), known,
                     float(diagnosis.confidence[members].mean()), float(diagnosis.entropy[members].mean()),
                     diagnosis.classes[top], float(counts[top] / members.sum())])
    return rows
