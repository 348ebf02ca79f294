"""Issue 22: paired differences between any two cached bench rows, across groups (a probe row run at a sweep
point as its own row is paired with that sweep point's blind_kd, say), with the share of the oracle − blind KD
gap when an oracle is given.

    .venv/bin/python results/issue22/paired.py ROW_DIR BASE_DIR [ORACLE_DIR]

Each DIR is a folder of seed<S>.json files under results/issue22/<bench>/, e.g.
fashion-wild/runs/recommended-keep15-at90 fashion-wild/sweep/0.9/blind_kd fashion-wild/sweep/0.9/oracle.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def accuracies(folder: str) -> dict[int, float]:
    return {int(p.stem[4:]): 100 * json.loads(p.read_text())["test_acc"] for p in (HERE / folder).glob("seed*.json")}


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se, len(diffs)


def main(row: str, base: str, oracle: str | None = None) -> None:
    a, b = accuracies(row), accuracies(base)
    mean, se, n = paired(a, b)
    text = (f"{row}: {statistics.mean(a.values()):.2f} vs {base}: {statistics.mean(b.values()):.2f}; "
            f"paired Δ {mean:+.2f} ± {se:.2f} over {n} seeds")
    if oracle and set(accuracies(oracle)) & set(b):
        gap, gap_se, _ = paired(accuracies(oracle), b)
        text += f"; oracle gap {gap:+.2f} ± {gap_se:.2f}, share of it {100 * mean / gap:.0f} %"
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
