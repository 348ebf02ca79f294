"""Issue 22, offline: the share ``relative_density`` reads off each pool as a function of the seed it is fitted on
(the top ``keep`` of the pool by ``fitted.SEED_SCORE``; the recipe uses 5 %) and of the covariance shrinkage, against
the true relevant share (provenance, used only to measure).

    .venv/bin/python results/issue22/share_by_seed.py > results/issue22/share_by_seed.md
"""
from __future__ import annotations

import torch
from share_estimates import POOLS, teacher_pass  # noqa: E402  (run from this folder's script path)

from kd3.scores import compute_score, fitted
from kd3.scores.share import relative_density

SETTINGS = [(keep, shrink) for keep in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4) for shrink in (0.1, 0.5)]


def main() -> None:
    torch.set_num_threads(1)
    print("| pool | true share | " + " | ".join(f"seed {k:.1%}, shrink {s}" for k, s in SETTINGS) + " |")
    print("|---" * (len(SETTINGS) + 2) + "|")
    for label, builder, variant, size, fraction, teacher in POOLS:
        relevant, outputs, _ = teacher_pass(builder, variant, size, fraction, teacher)
        seed = compute_score(fitted.SEED_SCORE, outputs)
        shares = [relative_density(outputs, seed, keep=k, shrink=s).share for k, s in SETTINGS]
        print(f"| {label} | {relevant.mean():.2f} | " + " | ".join(f"{v:.2f}" for v in shares) + " |")


if __name__ == "__main__":
    main()
