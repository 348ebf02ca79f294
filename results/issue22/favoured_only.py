"""Issue 22, offline: the recipe's kept set with and without ``favoured_only`` (of the per-class share of the
ratio budget, only images whose log density ratio is > 0), against provenance: size, precision, recall.

    .venv/bin/python results/issue22/favoured_only.py > results/issue22/favoured_only.md
"""
from __future__ import annotations

import numpy as np
import torch
from share_estimates import teacher_pass  # this folder (run as a script)

from kd3.methods.kd3.selection import percentile_select_count
from kd3.scores import compute_score, fitted
from kd3.scores.share import relative_density

POOLS = [(f"fashion-wild, {f:.0%} irrelevant", "fashion-wild", "default", 20000, f, "fashion-lenet5_bn.pt")
         for f in (0.0, 0.25, 0.7, 0.9)] + [
    ("fashion-wild hard, 70 % irrelevant", "fashion-wild", "hard", 20000, 0.7, "fashion-lenet5_bn.pt"),
    ("digits-wild, 70 % irrelevant", "digits-wild", "default", 10000, 0.7, "mnist5k-lenet5_bn.pt"),
    ("fashion-wild, 70 %, GAP teacher", "fashion-wild", "default", 20000, 0.7, "fashion-cnn_small_bn.pt")]


def describe(kept: np.ndarray, relevant: np.ndarray) -> str:
    return f"{kept.sum()} | {relevant[kept].mean():.3f} | {relevant[kept].sum() / relevant.sum():.3f}"


def main() -> None:
    torch.set_num_threads(1)
    print("| pool | per class: kept | precision | recall | per class, favoured only: kept | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for label, builder, variant, size, fraction, teacher in POOLS:
        relevant, outputs, _ = teacher_pass(builder, variant, size, fraction, teacher)
        estimate = relative_density(outputs, compute_score(fitted.SEED_SCORE, outputs))
        budget = round(estimate.share * len(relevant))
        score, prediction = compute_score("bn_grid_maha", outputs), outputs.logits.argmax(dim=1)
        kept = np.zeros(len(relevant), dtype=bool)
        kept[percentile_select_count(score, prediction, outputs.logits.shape[1], budget).indices.numpy()] = True
        favoured = kept & (estimate.llr > 0).numpy()
        print(f"| {label} | {describe(kept, relevant)} | {describe(favoured, relevant)} |", flush=True)


if __name__ == "__main__":
    main()
