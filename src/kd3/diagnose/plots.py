"""The diagnosis's PNGs (matplotlib, Agg backend): each function writes one figure and returns its path."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from kd3.diagnose.analysis import KEEP_FRACTIONS, Diagnosis  # noqa: E402

HISTOGRAM_SCORES = ("max_softmax", "feature_norm", "bn_meanlogvar_late")  # plus the default score


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _heatmap(ax: plt.Axes, values: np.ndarray, rows: list[str], columns: list[str], fmt: str,
             cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None) -> None:
    """An annotated heatmap; ``rows`` empty leaves the row labels to a neighbouring panel."""
    image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(values)), rows or [""] * len(values), fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            red, green, blue, _ = image.cmap(image.norm(v))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # perceived luminance of the cell
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    plt.colorbar(image, ax=ax, fraction=0.03)


def predicted_classes(d: Diagnosis, out: Path) -> Path:
    """Stacked bars of the teacher's predicted classes by source, and each source's spread over classes."""
    sources = d.groups("source")
    colors = _colors(sources)
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.1]})
    bottom = np.zeros(d.num_classes)
    for name in sources:
        counts = np.bincount(d.prediction[d.source == name], minlength=d.num_classes)
        bars.bar(range(d.num_classes), counts, bottom=bottom, color=colors[name], label=name)
        bottom += counts
    bars.set_xticks(range(d.num_classes), d.classes, rotation=45, ha="right")
    bars.set_ylabel("pool images")
    bars.set_title("teacher's predicted class, stacked by source")
    bars.legend(fontsize=8)
    shares = np.stack([np.bincount(d.prediction[d.source == n], minlength=d.num_classes) / (d.source == n).sum()
                       for n in sources])
    _heatmap(heat, 100 * shares, [f"{n} ({(d.source == n).sum()})" for n in sources], d.classes, ".0f",
             cmap="magma", vmin=0, vmax=100)
    heat.set_title("% of each source predicted as each class")
    return _save(fig, out / "predicted_classes.png")


def confidence_entropy(d: Diagnosis, out: Path) -> Path:
    """Histograms of the teacher's confidence and entropy, per source and per style (densities)."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    max_entropy = np.log(d.num_classes)
    for row, (values, label, limit) in enumerate([(d.confidence, "max softmax", (1 / d.num_classes, 1.0)),
                                                 (d.entropy, "entropy (nats)", (0.0, max_entropy))]):
        for col, by in enumerate(("source", "style")):
            groups = d.source if by == "source" else d.style
            names = d.groups(by)
            colors = _colors(names)
            ax = axes[row, col]
            for name in names:
                ax.hist(values[groups == name], bins=40, range=limit, density=True, histtype="step", linewidth=1.5,
                        color=colors[name], label=f"{name} (mean {values[groups == name].mean():.2f})")
            ax.set_xlabel(label)
            ax.set_ylabel("density")
            ax.set_title(f"teacher {label} by {by}")
            ax.legend(fontsize=7)
    return _save(fig, out / "confidence_entropy.png")


def score_aurocs(d: Diagnosis, out: Path) -> Path:
    """AUROC of every score, overall, against each irrelevant source and for each relevant style."""
    names = list(d.aurocs)
    columns = list(next(iter(d.aurocs.values())))
    values = np.array([[d.aurocs[n][c] for c in columns] for n in names])
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 4, 0.38 * len(names) + 2))
    _heatmap(ax, values, names, columns, ".2f", cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_title("AUROC relevant vs irrelevant (0.5 = chance; src: all relevant vs that source; "
                 "rel: / style: that relevant source / style vs all irrelevant)", fontsize=9)
    return _save(fig, out / "score_auroc.png")


def kept_classes(d: Diagnosis, out: Path) -> Path:
    """Predicted-class histogram of what each score keeps (its global top 30 / 50 / 70 %)."""
    names = list(d.kept)
    fig, axes = plt.subplots(1, len(KEEP_FRACTIONS), figsize=(0.75 * d.num_classes * len(KEEP_FRACTIONS) + 5,
                                                              0.38 * len(names) + 2.5))
    for i, (ax, fraction) in enumerate(zip(np.atleast_1d(axes), KEEP_FRACTIONS)):
        counts = np.array([d.kept[n][fraction].per_class for n in names], dtype=float)
        _heatmap(ax, counts, names if i == 0 else [], d.classes, ".0f", cmap="Blues")
        ax.set_title(f"kept images per predicted class, top {fraction:.0%}", fontsize=9)
    return _save(fig, out / "kept_classes.png")


def score_histograms(d: Diagnosis, out: Path) -> Path:
    """A few scores' distributions per source, in pool percentiles so the panels share one axis."""
    names = [n for n in (*HISTOGRAM_SCORES, d.default_score) if n in d.scores]
    names = list(dict.fromkeys(names))
    sources = d.groups("source")
    colors = _colors(sources)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        percentile = np.argsort(np.argsort(d.scores[name], kind="stable"), kind="stable") / len(d.scores[name])
        for source in sources:
            ax.hist(percentile[d.source == source], bins=25, range=(0, 1), density=True, histtype="step",
                    linewidth=1.5, color=colors[source], label=source)
        ax.set_title(name + (" (default)" if name == d.default_score else ""), fontsize=9)
        ax.set_xlabel("pool percentile of the score (right = kept first)")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out / "score_by_source.png")


def write_plots(d: Diagnosis, out: Path) -> list[Path]:
    paths = [predicted_classes(d, out), confidence_entropy(d, out), kept_classes(d, out)]
    if d.aurocs:
        paths += [score_aurocs(d, out), score_histograms(d, out)]
    return paths
