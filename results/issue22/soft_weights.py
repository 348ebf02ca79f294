"""Issue 22. Offline: sampling weights from the density ratio (posterior share*exp(llr) and sigmoid(llr), floors
0/0.05/0.2): the sampled stream's precision against provenance and its effective sample size (share of the pool).

    cd results/issue22 && ../../.venv/bin/python soft_weights.py
"""
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from share_estimates import POOLS, teacher_pass

from kd3.scores import compute_score, fitted
from kd3.scores.share import relative_density

torch.set_num_threads(1)
for label, builder, variant, size, fraction, teacher in POOLS:
    relevant, out, _ = teacher_pass(builder, variant, size, fraction, teacher)
    rel = torch.from_numpy(relevant)
    est = relative_density(out, compute_score(fitted.SEED_SCORE, out))
    s = est.share
    line = [f"{label:36s} est {s:.2f}"]
    for name, w in (("post", (s * est.llr.exp()).clamp(max=1)), ("sig", torch.sigmoid(est.llr))):
        for floor in (0.0, 0.05, 0.2):
            ww = w.clamp(min=floor)
            prec = float((ww * rel).sum() / ww.sum())
            ess = float(ww.sum() ** 2 / (ww ** 2).sum()) / len(ww)
            line.append(f"{name}{floor}: p{prec:.2f} ess{ess:.2f}")
    print(" | ".join(line), flush=True)
