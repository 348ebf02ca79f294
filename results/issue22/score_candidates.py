"""Issue 22, offline: candidate relevance scores for near-OOD junk, AUROC against provenance (used only to
measure) on fashion-wild's sweep, its hard variant and digits-wild. The default ``bn_grid_maha`` beside:

- kNN (Sun et al., ICML 2022): cosine similarity to the k-th nearest image of a reference set, on the
  l2-normalised classifier input (penultimate features) or on the BN grid features; the reference set is
  the fit's seed (top 5 % by ``fitted.SEED_SCORE``) or the top 10 % / 20 % by ``bn_grid_maha``;
- Mahalanobis on l2-normalised BN grid features (Müller & Hein), on features standardised over the pool;
- ``bn_grid_maha`` re-fitted on its own top 5 % / 10 %, seeded on 2 % / 10 % instead of 5 %, shrunk 0.3 / 0.6;
- one depth at a time (layer 0: the first BatchNorm's 24 grid values, layer 1: the second's 64), and the
  depths' distances z-scored on the seed and combined by their minimum or sum.

    .venv/bin/python results/issue22/score_candidates.py > results/issue22/score_candidates.md
"""
from __future__ import annotations

import torch
from share_estimates import POOLS, teacher_on_pool  # noqa: E402  (run from this folder's script path)

from kd3.data.augment import Normalizer
from kd3.diagnose.metrics import auroc
from kd3.scores import compute_score, fitted

FIRST_LAYER_DIM = 24  # lenet5_bn: 6 channels × 2×2 grid cells before the second BatchNorm's 16 × 4


@torch.inference_mode()
def penultimate(net: torch.nn.Module, images: torch.Tensor, normalize: Normalizer) -> torch.Tensor:
    rows: list[torch.Tensor] = []
    handle = net.classifier.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].flatten(1)))
    net.eval()
    for start in range(0, len(images), 2048):
        net(normalize(images[start:start + 2048]))
    handle.remove()
    return torch.cat(rows).float()


def knn_similarity(x: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Cosine similarity to the k-th nearest reference image (a reference image skips itself)."""
    x = torch.nn.functional.normalize(x.float(), dim=1)
    is_reference = torch.zeros(len(x), dtype=torch.bool)
    is_reference[reference] = True
    out = torch.empty(len(x))
    for start in range(0, len(x), 4096):
        top = (x[start:start + 4096] @ x[reference].T).topk(k + 1, dim=1).values
        out[start:start + 4096] = torch.where(is_reference[start:start + 4096], top[:, k], top[:, k - 1])
    return out


def maha(features: torch.Tensor, prediction: torch.Tensor, chosen: torch.Tensor,
         shrink: float = fitted.SHRINK) -> torch.Tensor:
    means, cholesky = fitted.fit_gaussians(features, prediction, chosen, shrink)
    return -fitted.min_mahalanobis(features, means, cholesky)


def candidates(net, pool, outputs, normalize) -> dict[str, torch.Tensor]:
    features, prediction = outputs.bn_grid.double(), outputs.logits.argmax(dim=1)
    dim = features.shape[1]
    seed = compute_score(fitted.SEED_SCORE, outputs)
    chosen = fitted.seed_indices(seed, fitted.KEEP, dim)
    base = maha(features, prediction, chosen)
    out = {"bn_grid_maha (default)": base}
    hidden = penultimate(net, pool.images, normalize)
    for name, score, share in (("seed 5 %", seed, 0.05), ("maha top 10 %", base, 0.10), ("maha top 20 %", base, 0.20)):
        reference = torch.sort(-score.double(), stable=True).indices[: int(share * len(score))]
        out[f"kNN k=10 penultimate, ref {name}"] = knn_similarity(hidden, reference, 10)
        out[f"kNN k=10 BN grid, ref {name}"] = knn_similarity(outputs.bn_grid, reference, 10)
    out["maha l2-normalised"] = maha(torch.nn.functional.normalize(features, dim=1), prediction, chosen)
    out["maha standardised"] = maha((features - features.mean(0)) / features.std(0).clamp_min(1e-6), prediction, chosen)
    for share in (0.05, 0.10):
        out[f"maha refit on own top {share:.0%}"] = maha(features, prediction, fitted.seed_indices(base, share, dim))
    for keep in (0.02, 0.10):
        out[f"maha seed {keep:.0%}"] = maha(features, prediction, fitted.seed_indices(seed, keep, dim))
    for shrink in (0.3, 0.6):
        out[f"maha shrink {shrink}"] = maha(features, prediction, chosen, shrink)
    depths = [maha(features[:, :FIRST_LAYER_DIM], prediction, chosen), maha(features[:, FIRST_LAYER_DIM:], prediction, chosen)]
    out["maha layer 0 only"], out["maha layer 1 only"] = depths
    z = torch.stack([(d - d[chosen].mean()) / d[chosen].std() for d in depths])
    out["maha per depth, min of z"] = z.min(dim=0).values
    out["maha per depth, sum of z"] = z.sum(dim=0)
    return out


def main() -> None:
    torch.set_num_threads(1)
    columns, table = [], {}
    for label, builder, variant, size, fraction, teacher in POOLS:
        if fraction == 0.0:
            continue  # no junk: AUROC undefined
        pool, net, normalize, outputs, _ = teacher_on_pool(builder, variant, size, fraction, teacher)
        relevant = pool.relevant.astype(bool)
        columns.append(label)
        for name, score in candidates(net, pool, outputs, normalize).items():
            table.setdefault(name, []).append(auroc(score.double().numpy(), relevant))
    print("| score | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
