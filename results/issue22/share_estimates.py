"""Issue 22, offline: the relevant share that ``kd3.scores.share.relative_density`` reads off each pool, against
provenance (used only to measure), and the AUROC of bn_grid_maha and of the log density ratio.

    .venv/bin/python results/issue22/share_estimates.py > results/issue22/share_estimates.md

Pools and teacher passes come from kd3's caches (teachers: `kd3 train-teacher teachers/fashion-lenet5_bn`,
`kd3 train-teacher teachers/mnist5k-lenet5_bn`).
"""
from __future__ import annotations

import numpy as np

from kd3.data.augment import Normalizer
from kd3.data.pool import Pool
from kd3.data.pools import load_or_build_pool
from kd3.diagnose.metrics import auroc
from kd3.models.base import Net
from kd3.paths import cache_dir
from kd3.scores import cached_teacher_outputs, compute_score, fitted
from kd3.scores.outputs import TeacherOutputs
from kd3.scores.share import relative_density
from kd3.teacher import TeacherInfo, load_teacher

POOLS = [(f"fashion-wild, {f:.0%} irrelevant", "fashion-wild", "default", 20000, f, "fashion-lenet5_bn.pt")
         for f in (0.0, 0.25, 0.5, 0.7, 0.9)] + [
    ("fashion-wild hard, 70 % irrelevant", "fashion-wild", "hard", 20000, 0.7, "fashion-lenet5_bn.pt"),
    ("digits-wild, 70 % irrelevant", "digits-wild", "default", 10000, 0.7, "mnist5k-lenet5_bn.pt")]


def seed0_pool(builder: str, variant: str, size: int, fraction: float) -> Pool:
    """One row's pool as the benches build it (seed 0), from kd3's cache."""
    return load_or_build_pool(builder, cache_dir(), size=size, irrelevant_fraction=fraction, variant=variant, seed=0)


def teacher_on_pool(builder: str, variant: str, size: int, fraction: float,
                    teacher: str) -> tuple[Pool, Net, Normalizer, TeacherOutputs, TeacherInfo]:
    """One row of POOLS: its seed-0 pool, the cached teacher with its input normalisation, the teacher's
    outputs on the pool (cached) and its record."""
    pool = seed0_pool(builder, variant, size, fraction)
    net, info = load_teacher(cache_dir() / "teachers" / teacher)
    normalize = Normalizer(tuple(info.mean), tuple(info.std))
    return pool, net, normalize, cached_teacher_outputs(pool, net, normalize, cache_dir()), info


def teacher_pass(builder: str, variant: str, size: int, fraction: float,
                 teacher: str) -> tuple[np.ndarray, TeacherOutputs, TeacherInfo]:
    """One row of POOLS: which images are relevant (provenance, used only to measure), the teacher's outputs
    on the pool, and the teacher's record."""
    pool, _, _, outputs, info = teacher_on_pool(builder, variant, size, fraction, teacher)
    return pool.relevant.astype(bool), outputs, info


def main() -> None:
    print("| pool | teacher | true relevant share | estimated share | precision of the kept share (by bn_grid_maha) | "
          "recall | AUROC bn_grid_maha | AUROC density ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for label, builder, variant, size, fraction, teacher in POOLS:
        relevant, outputs, info = teacher_pass(builder, variant, size, fraction, teacher)
        estimate = relative_density(outputs, compute_score(fitted.SEED_SCORE, outputs))
        score = compute_score("bn_grid_maha", outputs).double().numpy()
        count = max(1, round(estimate.share * len(score)))
        kept = np.zeros(len(score), dtype=bool)
        kept[np.argsort(-score, kind="stable")[:count]] = True
        print(f"| {label} | {info.sha256[:12]} | {relevant.mean():.3f} | {estimate.share:.3f} | {relevant[kept].mean():.3f} | "
              f"{kept[relevant].mean():.3f} | {auroc(score, relevant):.3f} | {auroc(estimate.llr.numpy(), relevant):.3f} |")


if __name__ == "__main__":
    main()
