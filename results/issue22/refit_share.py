"""Issue 22. Offline: the ratio's share re-estimated by refitting the class-conditional fit on the ratio's own top
half of its estimate, 6 rounds (the trajectory per pool).

    cd results/issue22 && ../../.venv/bin/python refit_share.py
"""
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from share_estimates import POOLS, teacher_pass

from kd3.diagnose.metrics import auroc
from kd3.scores import compute_score, fitted
from kd3.scores.share import gaussian_log_density

torch.set_num_threads(1)

def llr_from_seed(feat, pred, chosen, shrink=fitted.SHRINK):
    means, chol = fitted.fit_gaussians(feat, pred, chosen, shrink)
    counts = torch.bincount(pred[chosen]).double()
    counts = counts[counts >= 2] if bool((counts >= 2).any()) else counts.sum().reshape(1)
    rel = gaussian_log_density(feat, means, chol, torch.log(counts / counts.sum()))
    allidx = torch.arange(len(feat))
    bm, bc = fitted.fit_gaussians(feat, torch.zeros_like(pred), allidx, shrink)
    bg = gaussian_log_density(feat, bm, bc, torch.zeros(1, dtype=torch.float64))
    return rel - bg

rows = []
for label, builder, variant, size, fraction, teacher in POOLS:
    rel, out, _ = teacher_pass(builder, variant, size, fraction, teacher)
    feat, pred = out.bn_grid, out.logits.argmax(1)
    seedscore = compute_score(fitted.SEED_SCORE, out)
    chosen = fitted.seed_indices(seedscore, fitted.KEEP, feat.shape[1])
    llr = llr_from_seed(feat, pred, chosen)
    s0 = float((llr > 0).double().mean())
    traj = [s0]
    # iterate: seed = top (frac * share) by llr
    for frac in (0.5,):
        s, ratio = s0, llr
        for _ in range(6):
            n = max(2 * feat.shape[1], int(frac * s * len(feat)))
            chosen2 = torch.sort(-ratio, stable=True).indices[:n]
            ratio = llr_from_seed(feat, pred, chosen2)
            s = float((ratio > 0).double().mean())
            traj.append(round(s, 3))
    seedprec = rel[chosen.numpy()].mean()
    last_auroc = auroc(ratio.numpy(), rel) if rel.mean() < 1 else float("nan")
    print(f"{label:38s} true {rel.mean():.2f} est {s0:.3f} seedprec {seedprec:.2f} iter {traj[1:]} "
          f"auroc_llr_last {last_auroc:.3f}", flush=True)
