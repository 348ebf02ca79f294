"""Issue 22, offline: bn_grid_maha fitted on a per-class seed (each teacher-predicted class's top images by the seed
score, KD³'s percentile rule) instead of the pool's top 5 %: the score's AUROC against provenance, and the precision
and recall of the recipe's kept set (the ratio budget shared by the classes) under either fit.

    .venv/bin/python results/issue22/seed_per_class.py > results/issue22/seed_per_class.md
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from share_estimates import teacher_pass  # this folder (run as a script)

from kd3.diagnose.metrics import auroc
from kd3.methods.kd3.selection import percentile_select_count
from kd3.scores import compute_score, fitted
from kd3.scores.share import relative_density

POOLS = [(f"fashion-wild, {f:.0%} irrelevant", "fashion-wild", "default", 20000, f, "fashion-lenet5_bn.pt")
         for f in (0.25, 0.7, 0.9)] + [
    ("fashion-wild hard, 70 % irrelevant", "fashion-wild", "hard", 20000, 0.7, "fashion-lenet5_bn.pt"),
    ("digits-wild, 70 % irrelevant", "digits-wild", "default", 10000, 0.7, "mnist5k-lenet5_bn.pt"),
    ("fashion-wild, 70 %, GAP teacher", "fashion-wild", "default", 20000, 0.7, "fashion-cnn_small_bn.pt")]


def per_class_seed(prediction: torch.Tensor, classes: int) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
    """``fitted.seed_indices``'s count, shared equally by the predicted classes."""
    def seed_indices(seed: torch.Tensor, keep: float, dim: int) -> torch.Tensor:
        count = min(seed.numel(), max(math.ceil(keep * seed.numel()), 2 * dim))
        return percentile_select_count(seed.double(), prediction, classes, count).indices
    return seed_indices


def main() -> None:
    torch.set_num_threads(1)
    print("| pool | AUROC, global seed (default) | AUROC, per-class seed | recipe's kept set, global seed: precision / "
          "recall | same, per-class seed |")
    print("|---|---|---|---|---|")
    default = fitted.seed_indices
    for label, builder, variant, size, fraction, teacher in POOLS:
        relevant, outputs, _ = teacher_pass(builder, variant, size, fraction, teacher)
        seed, prediction = compute_score(fitted.SEED_SCORE, outputs), outputs.logits.argmax(dim=1)
        classes = outputs.logits.shape[1]
        budget = round(relative_density(outputs, seed).share * len(relevant))
        cells = []
        for seeding in (default, per_class_seed(prediction, classes)):
            fitted.seed_indices = seeding
            try:
                score = fitted.seeded_mahalanobis(outputs, seed)
            finally:
                fitted.seed_indices = default
            kept = percentile_select_count(score, prediction, classes, budget).indices.numpy()
            cells.append((f"{auroc(score.numpy(), relevant):.3f}",
                          f"{relevant[kept].mean():.3f} / {relevant[kept].sum() / relevant.sum():.3f}"))
        print(f"| {label} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | {cells[1][1]} |", flush=True)


if __name__ == "__main__":
    main()
