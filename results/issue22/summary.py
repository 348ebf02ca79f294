"""Issue 22: the candidate against blind KD per sweep point from the cached bench records under results/issue22/
(paired Δ ± SE over the seeds both rows finished, last-epoch accuracy), next to the committed old-teacher
figures of the old recipe and the oracle (results/fashion-wild-sweep.md, results/digits-wild.md, 5 seeds,
teacher 6267ee237be6 / fb1d11e05fd5), and the candidate's wall time relative to blind KD's in the same runs.

    .venv/bin/python results/issue22/summary.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parent
# Committed figures with the earlier teachers (5 seeds): Δ vs blind KD ± SE of the old recipe and of the oracle.
OLD = {"sweep/0": ("-0.88 ± 0.28", "+0.00 ± 0.00", 0.0), "sweep/0.25": ("-0.59 ± 0.23", "-0.15 ± 0.40", -0.15),
       "sweep/0.5": ("+1.73 ± 0.56", "+1.21 ± 0.93", 1.21), "sweep/0.7": ("+2.94 ± 0.22", "+2.76 ± 0.23", 2.76),
       "sweep/0.9": ("+3.49 ± 0.24", "+5.08 ± 0.88", 5.08), "digits-wild": ("-2.04 ± 0.70", "-8.72 ± 4.53", -8.72)}


def records(folder: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("seed*.json")}


def main() -> None:
    groups = [(f"fashion-wild {g.name}", g, f"sweep/{g.name}") for g in sorted((ROOT / "fashion-wild" / "sweep").iterdir(),
                                                                        key=lambda p: float(p.name))]
    groups.append(("digits-wild", ROOT / "digits-wild" / "runs", "digits-wild"))
    print("| pool | seeds | blind KD acc % | candidate acc % | candidate Δ vs blind KD ± SE | old recipe Δ (old teacher) | "
          "oracle Δ (old teacher) | candidate Δ / old oracle Δ | wall time candidate / blind KD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, folder, key in groups:
        base, cand = records(folder / "blind_kd"), records(folder / "recommended-ratio")
        seeds = sorted(set(base) & set(cand))
        if not seeds:
            continue
        b = np.array([100 * base[s]["test_acc"] for s in seeds])
        c = np.array([100 * cand[s]["test_acc"] for s in seeds])
        d = c - b
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        wall = sum(cand[s]["wall_time"] for s in seeds) / sum(base[s]["wall_time"] for s in seeds)
        old_recipe, old_oracle, gap = OLD[key]
        share = f"{100 * d.mean() / gap:.0f} %" if gap > 0.5 else "–"
        print(f"| {label} | {','.join(map(str, seeds))} | {b.mean():.2f} ± {b.std(ddof=1) if len(b) > 1 else 0:.2f} | "
              f"{c.mean():.2f} ± {c.std(ddof=1) if len(c) > 1 else 0:.2f} | {d.mean():+.2f} ± {se:.2f} | {old_recipe} | "
              f"{old_oracle} | {share} | {wall:.2f} |")


if __name__ == "__main__":
    main()
