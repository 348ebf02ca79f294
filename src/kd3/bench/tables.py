"""results/<bench>.md, .json and charts (plus the sweep / hard-variant page) from the cached run JSONs.

Only cached records are read, so tables can be rewritten at any time, also mid-bench: rows with
fewer finished seeds than requested are marked, rows without any say "not run".
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd3.bench import plots
from kd3.bench.records import load_group, read_context, write_json
from kd3.bench.runner import SELECTION_KEYS
from kd3.bench.spec import KINDS, MAIN_GROUP, BenchSpec, sweep_group
from kd3.bench.stats import binomial_se, mean_std, paired_difference

NAN = float("nan")
Printable = tuple[str, list[str], list[list[str]]]  # title, columns, rows: what the CLI prints


def _ok(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def summarise_row(name: str, kind: str, records: dict[int, dict[str, Any]], seeds: list[int],
                  baseline: dict[int, float] | None) -> dict[str, Any]:
    """One table row over the requested ``seeds``; ``baseline`` maps seed -> the baseline row's
    accuracy for the paired difference (None for the baseline row itself)."""
    kept = {s: records[s] for s in seeds if s in records}
    accuracy = {s: r["test_acc"] for s, r in kept.items()}
    mean, std = mean_std(accuracy.values())
    diff, diff_se, diff_seeds = paired_difference(accuracy, baseline) if baseline is not None else (NAN, NAN, 0)

    def average(get: Callable[[dict[str, Any]], Any]) -> float:
        return mean_std(get(r) for r in kept.values())[0]

    def selection(key: str) -> dict[str, float]:
        return {k: average(lambda r: (r.get(key) or {}).get(k)) for k in SELECTION_KEYS}

    return {"name": name, "kind": kind, "uses": KINDS[kind], "seeds": sorted(accuracy), "seeds_requested": len(seeds),
            "test_acc": accuracy, "mean": mean, "std": std, "diff": diff, "diff_se": diff_se, "diff_seeds": diff_seeds,
            "selection_last": selection("selection_last"), "selection_mean": selection("selection_mean"),
            "images_seen": average(lambda r: r["images_seen"]), "wall_time": average(lambda r: r["wall_time"]),
            "train_images_per_s": average(lambda r: r["train_images_per_s"])}


def _teacher_row(name: str, context: dict[str, Any]) -> dict[str, Any]:
    """One checkpoint, not trained per seed: listed once, without std or paired difference."""
    teacher = context.get("teacher", {})
    accuracy = teacher.get("test_accuracy", NAN)
    count = teacher.get("test_images") or 0
    row = summarise_row(name, "teacher", {}, [], None)
    return {**row, "mean": accuracy, "se": binomial_se(accuracy, count) if _ok(accuracy) else NAN,
            "seeds_requested": 0, "arch": teacher.get("arch", "")}


def group_rows(spec: BenchSpec, group: str, names: Iterable[str], seeds: list[int],
               context: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Summaries of ``names`` in one group, and the raw records they came from (for the header)."""
    found = load_group(spec.results_root, group, context.get("teacher", {}).get("sha256"))
    baseline = {s: r["test_acc"] for s, r in found.get(spec.baseline, {}).items()}
    rows = []
    for name in names:
        kind = spec.row(name).kind
        if kind == "teacher":
            rows.append(_teacher_row(name, context))
        else:
            rows.append(summarise_row(name, kind, found.get(name, {}), seeds,
                                      None if name == spec.baseline else baseline))
    records = [r for name in names for s, r in found.get(name, {}).items() if s in seeds]
    return rows, records


# -- formatting -----------------------------------------------------------------------------------
def _pct(mean: float, spread: float) -> str:
    if not _ok(mean):
        return ""
    return f"{100 * mean:.2f} ± {100 * spread:.2f}" if _ok(spread) else f"{100 * mean:.2f}"


def _mark(row: dict[str, Any]) -> str:
    """``*`` on a row with some, but fewer than the requested, seeds (one with none says "not run")."""
    return "*" if 0 < len(row["seeds"]) < row["seeds_requested"] else ""


def _seeds(row: dict[str, Any]) -> str:
    if row["kind"] == "teacher":
        return ""
    done, wanted = len(row["seeds"]), row["seeds_requested"]
    return str(done) if done >= wanted else f"{done}/{wanted}{_mark(row)}"


def _accuracy(row: dict[str, Any]) -> str:
    if row["kind"] == "teacher":
        return _pct(row["mean"], NAN) or "not found"
    return _pct(row["mean"], row["std"]) or "not run"


def _signed(diff: float, se: float) -> str:
    """A paired difference in points, ± its SE where there is one."""
    if not _ok(diff):
        return ""
    return f"{100 * diff:+.2f} ± {100 * se:.2f}" if _ok(se) else f"{100 * diff:+.2f}"


def _diff(row: dict[str, Any]) -> str:
    return _signed(row["diff"], row["diff_se"])


def _number(value: float, digits: int = 0) -> str:
    return f"{value:.{digits}f}" if _ok(value) else ""


def table_columns(baseline: str) -> list[str]:
    return ["row", "uses", "seeds", "test acc % (mean ± std)", f"Δ vs {baseline} (± SE)", "sel. precision",
            "sel. recall", "sel. precision (rel. & correct)", "sel. recall (rel. & correct)", "images seen",
            "wall s", "train img/s"]


def table_cells(row: dict[str, Any]) -> list[str]:
    selection = row["selection_last"]
    return [row["name"], row["uses"], _seeds(row), _accuracy(row), _diff(row),
            *[_number(selection[k], 3) for k in ("precision", "recall", "precision_correct", "recall_correct")],
            _number(row["images_seen"]), _number(row["wall_time"]), _number(row["train_images_per_s"])]


# Left out on the terminal, where twelve columns do not fit; the markdown and JSON have them all.
DETAIL_COLUMNS = ("uses", "sel. precision (rel. & correct)", "sel. recall (rel. & correct)", "images seen", "train img/s")


def compact(table: Printable) -> Printable:
    title, columns, rows = table
    keep = [i for i, column in enumerate(columns) if column not in DETAIL_COLUMNS]
    return title, [columns[i] for i in keep], [[row[i] for i in keep] for row in rows]


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, columns)) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(map(escape, row)) + " |" for row in rows]


# -- header ---------------------------------------------------------------------------------------
def _distinct(values: Iterable[Any]) -> str:
    return ", ".join(sorted({str(v) for v in values})) or "(no runs yet)"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _machine(record: dict[str, Any]) -> str:
    m = record["machine"]
    threads = record["config"]["train"]["threads"] or "default"
    return (f"{m['cores']} cores, {m['cpu']}, torch {m['torch']} with {threads} thread(s) per run, "
            f"GPU: {m['gpu'] or 'none'}")


def contamination_note(entry: dict[str, Any]) -> str:
    """The composition's suffix naming how many pool images copy the test set (empty where not checked)."""
    found = entry.get("contamination")
    if not found:
        return ""
    return (f"; {found['flagged']} images copy {found['against']} ({found['exact']} exact, {found['near']} near: "
            f"`kd3 data contamination`)")


def pool_composition(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "(not recorded: run the bench to record it)"
    meta, counts = entry["meta"], entry["meta"].get("counts")
    if not counts:
        return f"{entry['images']} images ({meta.get('pool', 'file')}){contamination_note(entry)}"
    parts = counts["source_style"]
    relevant = ", ".join(f"{k} {n}" for k, n in parts.items() if not k.endswith("/none") and n)
    irrelevant = ", ".join(f"{k.removesuffix('/none')} {n}" for k, n in parts.items() if k.endswith("/none") and n)
    return (f"{meta['pool']} ({meta['variant']}, seed {meta['seed']}): {entry['images']} images; "
            f"{counts['relevant']} relevant ({relevant or 'none'}); {counts['irrelevant']} irrelevant "
            f"({irrelevant or 'none'}){contamination_note(entry)}")


def header(spec: BenchSpec, records: list[dict[str, Any]], context: dict[str, Any], seeds: list[int],
           pools: dict[str, str]) -> dict[str, str]:
    """The facts a reader needs to trust and reproduce the tables, label -> text."""
    teacher = context.get("teacher", {})
    ran = [r for r in records if "reused_from" not in r]  # a reused record's time was spent once
    total = lambda key: _duration(sum(r[key] for r in ran))  # noqa: E731
    count = max({r["test_images"] for r in records} or {teacher.get("test_images") or 0})
    typical = mean_std(r["test_acc"] for r in records)[0]
    typical = typical if _ok(typical) else 0.8
    facts = {
        "commit": _distinct(r["commit"] for r in records),
        "command": _distinct(f"`{r['bench_command']}`" for r in records)
        + f"; each run's own `kd3 distill` line is in its JSON under {spec.results_root}/<group>/<row>/seed<S>.json",
        "machine": _distinct(_machine(r) for r in records),
        "networks": (f"teacher {teacher['arch']} (trained on {teacher['data']}, sha256 {teacher['sha256'][:12]})"
                     if teacher else "teacher (not recorded: run the bench to record it)")
        + f", student {_distinct(r['config']['student'] for r in records)}",
        "seeds": f"{seeds} (train.seed; every seed distils from the same pool)",
        "epochs": _distinct(r["epochs"] for r in records),
        "total wall time": f"{total('process_time')} of run processes ({total('wall_time')} in training loops), "
                           f"summed over the {len(ran)} run(s) here",
        "test set": f"{_distinct(r['config']['eval_data'] for r in records)}, {count} images: one accuracy has "
                    f"binomial SE {100 * binomial_se(typical, count):.2f} points (at {100 * typical:.1f}%, the mean "
                    "here), so single-run gaps within ~2 SE are noise; the Δ column's SE comes from the per-seed "
                    "paired differences",
    }
    return facts | {f"pool ({group})" if group != MAIN_GROUP else "pool": text for group, text in pools.items()}


def _bullets(facts: dict[str, str]) -> list[str]:
    return [f"- **{label}**: {text}" for label, text in facts.items()]


NOTES = ["`uses`: *original data* = a reference that sees the teacher's training data; *provenance* = the "
         "oracle keeps exactly the truly relevant pool images. Neither is a method; they bound what one can reach.",
         "`*` = fewer finished seeds than requested (mean and std over the finished ones).",
         "Selection columns: the last epoch's training set against the truly relevant pool images, and against "
         "those the teacher also classifies correctly; empty where the method does not train on the pool."]


@dataclass
class Section:
    """Part of a page: its markdown, its terminal tables, its summaries for the JSON, its sources."""

    lines: list[str] = field(default_factory=list)
    printable: list[Printable] = field(default_factory=list)
    groups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    pools: dict[str, str] = field(default_factory=dict)

    def add(self, other: Section) -> None:
        self.lines += other.lines
        self.printable += other.printable
        self.groups |= other.groups
        self.records += other.records
        self.pools |= other.pools


COMPARISON_COLUMNS = ["row", "vs", "paired seeds", "Δ (± SE), points", "Δ / SE"]


def comparison_cells(spec: BenchSpec, rows: list[dict[str, Any]]) -> list[list[str]]:
    """The spec's extra paired differences among ``rows`` (pairs with a row missing are left out)."""
    by_name = {r["name"]: r for r in rows}
    cells = []
    for pair in spec.comparisons:
        if pair.row not in by_name or pair.vs not in by_name:
            continue
        diff, se, count = paired_difference(by_name[pair.row]["test_acc"], by_name[pair.vs]["test_acc"])
        if count:
            cells.append([pair.row, pair.vs, str(count), _signed(diff, se),
                          f"{diff / se:+.1f}" if _ok(se) and se > 0 else ""])
    return cells


def _table_section(spec: BenchSpec, group: str, names: list[str], seeds: list[int], context: dict[str, Any],
                   title: str) -> Section:
    """A full table (the main one, or the hard variant's), and the spec's paired comparisons in it."""
    rows, records = group_rows(spec, group, names, seeds, context)
    columns, cells = table_columns(spec.baseline), [table_cells(r) for r in rows]
    lines = [f"## {title}", "", *markdown_table(columns, cells), ""]
    if pairs := comparison_cells(spec, rows):
        lines += ["Paired comparisons (same seeds, same test images):", "", *markdown_table(COMPARISON_COLUMNS, pairs), ""]
    return Section(lines=lines, printable=[(title, columns, cells)], groups={group: rows}, records=records,
                   pools={group: pool_composition(context.get("pools", {}).get(group))})


def _sweep_section(spec: BenchSpec, seeds: list[int], context: dict[str, Any], out: Path) -> Section:
    """Rows × irrelevant fractions: accuracy, paired difference to the baseline, and a line plot."""
    assert spec.sweep is not None
    section = Section()
    columns = ["row", *[f"{100 * v:g}% irrelevant" for v in spec.sweep.values]]
    by_value = {}
    for value in spec.sweep.values:
        rows, records = group_rows(spec, sweep_group(value), spec.sweep.rows, seeds, context)
        by_value[value] = rows
        section.groups[sweep_group(value)] = rows
        section.records += records
        section.pools[sweep_group(value)] = pool_composition(context.get("pools", {}).get(sweep_group(value)))
    if not section.records:
        return section  # nothing run yet: no page, no empty chart
    names = spec.sweep.rows
    accuracy = [[name, *[_accuracy(rows[i]) + _mark(rows[i]) for rows in by_value.values()]] for i, name in enumerate(names)]
    deltas = [[name, *[_diff(rows[i]) for rows in by_value.values()]] for i, name in enumerate(names)]
    series = {name: [(v, rows[i]["mean"], rows[i]["std"]) for v, rows in by_value.items()] for i, name in enumerate(names)}
    chart = plots.sweep_plot(series, f"{spec.name}: accuracy vs irrelevant fraction", out / f"{spec.name}-sweep.png")
    title = f"{spec.name} sweep: test acc % (mean ± std over seeds {seeds})"
    section.lines = [f"## {title}", "", *markdown_table(columns, accuracy), "",
                     f"## Paired difference to {spec.baseline} at each fraction (± SE, points)", "",
                     *markdown_table(columns, deltas), "", f"![{spec.name} sweep]({chart.name})", ""]
    section.printable = [(title, columns, accuracy)]
    return section


def write_tables(spec: BenchSpec, seeds: list[int] | None = None) -> list[Printable]:
    """Write results/<bench>.md, .json and -bars.png, and results/<bench>-sweep.md (+ .png) once a
    pool variation has runs; return the tables for the terminal. The sweep page is named per bench
    so two benches' sweeps never overwrite each other."""
    seeds = seeds if seeds is not None else spec.seeds
    context = read_context(spec.results_root)
    out = Path(spec.results_dir)
    title = f"{spec.name}: last-epoch test accuracy, mean ± std over seeds {seeds}"
    main = _table_section(spec, MAIN_GROUP, [r.name for r in spec.rows], seeds, context, title)
    facts = header(spec, main.records, context, seeds, main.pools)
    bars = plots.bar_chart(main.groups[MAIN_GROUP], title, out / f"{spec.name}-bars.png")
    lines = [f"# {spec.name}", "", *_bullets(facts), "",
             *main.lines, *[f"{note}  " for note in NOTES], "", f"![{spec.name} accuracy per row]({bars.name})"]

    variants = Section()
    if spec.sweep:
        variants.add(_sweep_section(spec, seeds, context, out))
    if spec.hard:
        variants.add(_table_section(spec, "hard", spec.hard.rows, seeds, context,
                                    f"{spec.name}, hard variant ({' '.join(spec.hard.overrides)})"))
    if variants.records:
        page = out / f"{spec.name}-sweep.md"
        page.write_text("\n".join([f"# {spec.name}: pool variations", "",
                                   *_bullets(header(spec, variants.records, context, seeds, variants.pools)), "",
                                   *variants.lines, *[f"{note}  " for note in NOTES]]) + "\n")
        lines += ["", f"Pool variations (irrelevant-fraction sweep, hard styles): [{page.name}]({page.name})"]
    (out / f"{spec.name}.md").write_text("\n".join(lines) + "\n")
    write_json(out / f"{spec.name}.json", {"bench": spec.name, "seeds": seeds, "baseline": spec.baseline,
                                           "header": facts,
                                           "groups": main.groups | (variants.groups if variants.records else {})})
    return main.printable + (variants.printable if variants.records else [])
