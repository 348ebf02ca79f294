"""The diagnosis as a document: one list of blocks, rendered to ``summary.md`` and ``summary.html``."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd3.diagnose.analysis import KEEP_FRACTIONS, Diagnosis, group_summary


@dataclass
class Block:
    kind: str  # h1, h2, p, table, img
    text: str = ""
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def auroc_columns(d: Diagnosis) -> list[str]:
    return list(next(iter(d.aurocs.values()))) if d.aurocs else []


def auroc_rows(d: Diagnosis) -> list[list[Any]]:
    columns = auroc_columns(d)
    return [[name + (" (default)" if name == d.default_score else ""), *[d.aurocs[name][c] for c in columns]]
            for name in d.aurocs]


def selection_rows(d: Diagnosis) -> list[list[Any]]:
    rows = []
    for name, by_fraction in d.kept.items():
        row: list[Any] = [name]
        for fraction in KEEP_FRACTIONS:
            k = by_fraction[fraction]
            row += [k.precision, k.recall, k.percentile_precision, k.percentile_recall]
        rows.append(row)
    return rows


def blocks(d: Diagnosis, header: list[str], images: dict[str, Path]) -> list[Block]:
    n = len(d.prediction)
    counts = np.bincount(d.prediction, minlength=d.num_classes)
    out = [Block("h1", f"Pool diagnosis: {d.title}"), *[Block("p", line) for line in header],
           Block("h2", "What the teacher predicts"),
           Block("p", "A class that irrelevant images pile into is the first thing to look for: a tall bar made of "
                      "irrelevant sources, or a source that goes almost entirely to one class."),
           Block("img", "predicted_classes.png"),
           Block("table", columns=("class", "images", "% of pool"),
                 rows=tuple((c, int(k), f"{100 * k / n:.1f}") for c, k in zip(d.classes, counts))),
           Block("h2", "How sure it is, per source and per style"),
           Block("img", "confidence_entropy.png")]
    summary_columns = ("{}", "images", "relevant", "mean confidence", "mean entropy", "most predicted as", "share")
    for by in ("source", "style"):
        out.append(Block("table", columns=(by, *summary_columns[1:]), rows=tuple(map(tuple, group_summary(d, by)))))
    out.append(Block("h2", "Relevance scores"))
    out.append(Block("p", "Every score comes from the teacher alone (one inference pass) and is oriented so that "
                          "higher = more relevant. Rank combinations (minrank:, meanrank:) work on pool percentiles."))
    if d.aurocs:
        out += [Block("p", "AUROC relevant vs irrelevant: `overall`; `src:X` = all relevant images vs irrelevant "
                           "source X; `rel:R` = relevant source R vs all irrelevant images (when there are several); "
                           "`style:Y` = relevant images of style Y vs all irrelevant ones. 0.5 is chance, below 0.5 "
                           "the score prefers junk."),
                Block("table", columns=("score", *auroc_columns(d)), rows=tuple(map(tuple, auroc_rows(d)))),
                Block("img", "score_auroc.png"),
                Block("p", "Selection at 30 / 50 / 70 % of the pool kept: P and R = precision and recall of the "
                           "score's global top fraction; Pc and Rc = the same for KD³'s percentile thresholds (at "
                           "most the same budget, an equal share per teacher-predicted class, each class keeping its "
                           "highest scores; kd3.methods.kd3.selection.percentile_select)."),
                Block("table", rows=tuple(map(tuple, selection_rows(d))),
                      columns=("score", *[f"{m}@{f:.0%}" for f in KEEP_FRACTIONS for m in ("P", "R", "Pc", "Rc")])),
                Block("img", "score_by_source.png")]
    else:
        out.append(Block("p", "This pool has no provenance, so the scores cannot be checked against relevance here; "
                              "what each would keep is below."))
    first = KEEP_FRACTIONS[0]
    out += [Block("h2", f"What each score would keep (top {first:.0%}), per predicted class"),
            Block("table", columns=("score", *d.classes),
                  rows=tuple((name, *k[first].per_class) for name, k in d.kept.items())),
            Block("img", "kept_classes.png")]
    return [b for b in out if b.kind != "img" or b.text in images]


def to_markdown(items: list[Block]) -> str:
    lines: list[str] = []
    for b in items:
        if b.kind in ("h1", "h2"):
            lines += [("# " if b.kind == "h1" else "## ") + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "img":
            lines += [f"![{b.text}]({b.text})", ""]
        else:
            lines += ["| " + " | ".join(b.columns) + " |", "|" + "---|" * len(b.columns)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in b.rows]
            lines.append("")
    return "\n".join(lines)


def to_html(items: list[Block], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}</style></head><body>"]
    for b in items:
        if b.kind in ("h1", "h2"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "img":
            parts.append(f"<p><img src='{html.escape(b.text)}' alt='{html.escape(b.text)}'></p>")
        else:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in b.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>"
                           for row in b.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(d: Diagnosis, out: Path, header: list[str], images: list[Path]) -> tuple[Path, Path]:
    items = blocks(d, header, {p.name: p for p in images})
    markdown, page = out / "summary.md", out / "summary.html"
    markdown.write_text(to_markdown(items))
    page.write_text(to_html(items, f"Pool diagnosis: {d.title}"))
    return markdown, page
