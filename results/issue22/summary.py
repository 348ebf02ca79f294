"""Issue 22: every row against blind KD at each pool, from the cached bench records under results/issue22/
(teacher 70fc421545ea for fashion-wild, 91afb3f163cf for digits-wild): paired Δ ± SE over the seeds both rows
finished (last-epoch accuracy), the share of the oracle − blind KD gap (same teacher, same seeds) where the
oracle gains more than a point, and wall time relative to blind KD's where both ran in the same bench invocation.

    .venv/bin/python results/issue22/summary.py > results/issue22/summary.md
    .venv/bin/python results/issue22/summary.py --readme   # the README's results table, from the same records
    .venv/bin/python results/issue22/summary.py --plot     # results/issue22/sweep-recipe.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parent
RECIPE = "recommended-ratio-pc-warm-fav"  # the preset's settings (configs/<pool>/recommended.yaml)
ROWS = [("recommended-fixed30", "issue-11 recipe (fixed 30 %)"), ("recommended-ratio", "ratio budget (the recipe until the warmup rows)"),
        ("recommended-ratio-kept", "ratio budget, Q from the kept images"),
        ("recommended-ratio-per-class", "ratio budget, per class"),
        ("recommended-ratio-pc-kept", "ratio budget, per class, Q from the kept images"),
        ("recommended-ratio-no-noise", "ratio budget, no noise term"),
        ("recommended-ratio-warm", "ratio budget, lr warmup (1 epoch)"),
        ("recommended-ratio-pc-warm", "ratio budget, per class, lr warmup (1 epoch)"),
        (RECIPE, "**ratio budget, per class, favoured only, lr warmup (1 epoch): the recipe**"),
        ("recommended-rest10", "the recipe + 10 % of each epoch drawn from the dropped images (rest_share 0.1)"),
        ("recommended-rest20", "the recipe + 20 % of each epoch drawn from the dropped images (rest_share 0.2)"),
        ("recommended-whole2", "the recipe after 2 epochs on the whole pool (whole_pool_epochs 2)"),
        ("recommended-whole5", "the recipe after 5 epochs on the whole pool (whole_pool_epochs 5)"),
        ("blind_kd-warm", "blind KD with lr warmup (1 epoch)"), ("oracle", "oracle")]
PROBES = [("fashion-wild 0.9", "fashion-wild/runs/recommended-keep15-at90", "fashion-wild/sweep/0.9", "fixed 15 % (probe)"),
          ("digits-wild", "digits-wild/runs/recommended-keep60", "digits-wild/runs", "fixed 60 % (probe)"),
          ("digits-wild", "digits-wild/runs/recommended-keep100", "digits-wild/runs", "fixed 100 % (probe)")]


def accuracies(folder: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("seed*.json")}


def records(folder: Path, row: str) -> dict[int, dict]:
    """A row's records in one group; the 0.7 sweep point is the main table's pool, whose rows ran either way
    (sweep/0.7 or runs/)."""
    found = accuracies(folder / row)
    return found or (accuracies(ROOT / "fashion-wild" / "runs" / row) if folder == ROOT / "fashion-wild" / "sweep" / "0.7" else {})


def paired(row: dict[int, dict], base: dict[int, dict]) -> tuple[np.ndarray, list[int]]:
    seeds = sorted(set(row) & set(base))
    return np.array([100 * (row[s]["test_acc"] - base[s]["test_acc"]) for s in seeds]), seeds


def line(label: str, name: str, row: dict, base: dict, oracle: dict) -> str | None:
    d, seeds = paired(row, base)
    if not seeds:
        return None
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    gap, gap_seeds = paired(oracle, base)
    share = f"{100 * d.mean() / gap.mean():.0f} %" if len(gap_seeds) >= len(seeds) and gap.mean() > 1 else "–"
    acc = np.array([100 * row[s]["test_acc"] for s in seeds])
    # Wall times compare only within one bench invocation (the machine's other load differs between them).
    same_bench = all(row[s]["bench_command"] == base[s]["bench_command"] for s in seeds)
    wall = f"{sum(row[s]['wall_time'] for s in seeds) / sum(base[s]['wall_time'] for s in seeds):.2f}" if same_bench else "–"
    return (f"| {label} | {name} | {len(seeds)} | {acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f} | "
            f"{d.mean():+.2f} ± {se:.2f} | {share} | {wall} |")


def main() -> None:
    groups = [(f"fashion-wild {g.name}", g) for g in sorted((ROOT / "fashion-wild" / "sweep").iterdir(), key=lambda p: float(p.name))]
    groups += [("fashion-wild hard (0.7)", ROOT / "fashion-wild" / "hard"),
               ("fashion-wild (0.7), GAP pair", ROOT / "fashion-wild-gap" / "runs"),
               ("digits-wild (0.7)", ROOT / "digits-wild" / "runs")]
    print("| pool | row | seeds | acc % (mean ± std) | Δ vs blind KD ± SE | share of the oracle gap | wall / blind KD |")
    print("|---|---|---|---|---|---|---|")
    for label, folder in groups:
        base, oracle = records(folder, "blind_kd"), records(folder, "oracle")
        for row, name in ROWS:
            text = line(label, name, records(folder, row), base, oracle)
            if text:
                print(text)
    for label, row, group, name in PROBES:
        text = line(label, name, accuracies(ROOT / row), accuracies(ROOT / group / "blind_kd"), accuracies(ROOT / group / "oracle"))
        if text:
            print(text)


README_POOLS = [("fashion-wild (70 %), LeNet-5-BN → LeNet-5-half-BN", "fashion-wild/sweep/0.7"),
                ("fashion-wild hard variant (70 %), same pair", "fashion-wild/hard"),
                ("fashion-wild (90 %), same pair", "fashion-wild/sweep/0.9"),
                ("fashion-wild (25 %), same pair", "fashion-wild/sweep/0.25"),
                ("fashion-wild (0 %: a clean pool), same pair", "fashion-wild/sweep/0"),
                ("fashion-wild (70 %), GAP + linear pair cnn_small_bn → cnn_small_half_bn", "fashion-wild-gap/runs"),
                ("digits-wild (70 %), MNIST-5k LeNet-5-BN → LeNet-5-half-BN", "digits-wild/runs")]


def readme_rows() -> None:
    """blind KD, the recipe, its Δ, the old recipe's Δ and the oracle per pool, each linked to summary.md."""
    link = "results/issue22/summary.md"

    def cell(text: str, bold: bool = False) -> str:
        return f"[{'**' + text + '**' if bold else text}]({link})" if text != "–" else "–"

    print("| pool (share irrelevant), networks | blind KD | recommended | Δ recommended | Δ recommended vs blind KD with "
          "warmup | Δ earlier recipes: fixed 30 % / ratio budget / ratio per class + warmup | oracle |")
    print("|---|---|---|---|---|---|---|")
    for label, group in README_POOLS:
        base, new, old, ratio, per_class, oracle, warm = (records(ROOT / group, r) for r in (
            "blind_kd", RECIPE, "recommended-fixed30", "recommended-ratio", "recommended-ratio-pc-warm", "oracle",
            "blind_kd-warm"))

        def mean_std(rows: dict[int, dict]) -> str:
            acc = np.array([100 * r["test_acc"] for r in rows.values()])
            return f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}" if len(acc) == 5 else "–"

        def delta(rows: dict[int, dict], against: dict[int, dict] = base) -> tuple[str, float]:
            d, seeds = paired(rows, against)
            if len(seeds) != 5:
                return "–", 0.0
            return f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f}".replace("-", "−"), d.mean()

        new_delta, gain = delta(new)
        wins = gain > 0
        earlier = " / ".join(cell(delta(rows)[0]) for rows in (old, ratio, per_class))
        print(f"| {label} | {cell(mean_std(base), not wins)} | {cell(mean_std(new), wins)} | {cell(new_delta, wins)} | "
              f"{cell(delta(new, warm)[0])} | {earlier} | {cell(mean_std(oracle))} |")


SWEEP_ROWS = [("blind_kd", "blind KD"), ("blind_kd-warm", "blind KD + warmup"),
              ("recommended-fixed30", "issue-11 recipe (fixed 30 %)"), ("recommended-ratio", "ratio budget"),
              ("recommended-ratio-pc-warm", "ratio budget, per class, warmup"),
              (RECIPE, "recommended (ratio budget, per class, favoured only, warmup)"), ("oracle", "oracle (provenance)")]


def sweep_plot(path: Path = ROOT / "sweep-recipe.png") -> None:
    """Accuracy against the pool's irrelevant share, mean ± SE over the 5 seeds, one line per row of SWEEP_ROWS."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    points = sorted((ROOT / "fashion-wild" / "sweep").iterdir(), key=lambda p: float(p.name))
    for row, name in SWEEP_ROWS:
        xs, means, ses = [], [], []
        for folder in points:
            acc = np.array([100 * r["test_acc"] for r in records(folder, row).values()])
            if len(acc) == 5:
                xs.append(100 * float(folder.name))
                means.append(acc.mean())
                ses.append(acc.std(ddof=1) / np.sqrt(len(acc)))
        axes.errorbar(xs, means, yerr=ses, marker="o", capsize=3, label=name, linewidth=2.5 if row == RECIPE else 1.2)
    axes.set_xlabel("irrelevant images in the pool (%)")
    axes.set_ylabel("last-epoch test accuracy (%), mean ± SE, 5 seeds")
    axes.set_title("fashion-wild sweep: LeNet-5-BN → LeNet-5-half-BN (teacher 70fc421545ea)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    {"--readme": readme_rows, "--plot": sweep_plot}.get(" ".join(sys.argv[1:]), main)()
