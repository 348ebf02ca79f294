"""Search for a data-free relevance score that fails less (issue 11, item 3), written to results/relevance.md.

For each of the three benchmark pools (fashion-wild, its hard variant, digits-wild) this scores every
pool image with issue 6's default relevance score, with the picked fitted score ``bn_grid_maha`` (kd3's
default since issue 11) and with the runners-up and ablations tried on the way, and measures, against
provenance (used only here, to measure, never inside a score): AUROC relevant vs irrelevant overall, per
irrelevant source and per relevant style, precision of the global top 30 % (P@30) and of KD³'s per-class
percentile rule (Pc@30).

Every design decision and hyper-parameter of ``bn_grid_maha`` was chosen on fashion-wild (default
variant) only; hard and digits-wild are reported unchanged.

    .venv/bin/python benchmarks/relevance_search.py [--out results/relevance.md] [--threads 1]

Teachers: ``~/.cache/kd3/teachers/fashion-lenet5_bn.pt`` (``kd3 train-teacher
configs/teachers/fashion-lenet5_bn.yaml``) and ``~/.cache/kd3/teachers/mnist5k-lenet5_bn.pt``
(``kd3 train-teacher configs/teachers/mnist5k-lenet5_bn.yaml``). Pools and teacher passes come from
kd3's caches (``load_or_build_pool``, ``cached_teacher_outputs``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kd3.bench.runner import cpu_model
from kd3.data.augment import Normalizer
from kd3.data.pools import load_or_build_pool
from kd3.diagnose.metrics import auroc, group_aurocs, precision_recall, top_fraction
from kd3.methods.kd3.selection import percentile_select
from kd3.paths import cache_dir
from kd3.scores import TeacherOutputs, cached_teacher_outputs, compute_score, fitted, percentile_ranks, teacher_outputs
from kd3.scores.outputs import BN_GRID
from kd3.scores.ranks import mean_rank
from kd3.teacher import load_teacher

POOLS = [  # (label, builder, variant, size, teacher)
    ("fashion-wild", "fashion-wild", "default", 20000, "fashion-lenet5_bn.pt"),
    ("fashion-wild hard", "fashion-wild", "hard", 20000, "fashion-lenet5_bn.pt"),
    ("digits-wild", "digits-wild", "default", 10000, "mnist5k-lenet5_bn.pt"),
]
PICK = "bn_grid_maha"
ISSUE6 = fitted.SEED_SCORE  # the default before this search (issue 6) is the pick's seed
KEPT = 0.3


# -- runners-up and ablations (not registered: each lost to the pick on fashion-wild) -------------------
def _seed(o: TeacherOutputs) -> torch.Tensor:
    return compute_score(fitted.SEED_SCORE, o)


def channel_means(o: TeacherOutputs) -> torch.Tensor:
    """bn_grid averaged over its 2×2 cells: each BN input's per-channel mean (exact for even map sizes)."""
    g = o.bn_grid.double()
    return g.view(len(g), -1, BN_GRID * BN_GRID).mean(dim=2)


def maha_on(features: torch.Tensor, o: TeacherOutputs, seed: torch.Tensor, keep: float = fitted.KEEP,
            per_class_seed: bool = False) -> torch.Tensor:
    if per_class_seed:  # each predicted class's top `keep` of its own images
        prediction = o.logits.argmax(dim=1)
        chosen = torch.zeros(len(seed), dtype=torch.bool)
        for k in prediction.unique():
            members = (prediction == k).nonzero().squeeze(1)
            chosen[members[percentile_ranks(seed[members]) > 1 - keep]] = True
        chosen = chosen.nonzero().squeeze(1)
    else:
        chosen = fitted.seed_indices(seed, keep, features.shape[1])
    means, cholesky = fitted.fit_gaussians(features, o.logits.argmax(dim=1), chosen, fitted.SHRINK)
    return -fitted.min_mahalanobis(features, means, cholesky)


def _logistic_fit(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, l2: float = 1e-3) -> torch.Tensor:
    """Weighted L2-regularised logistic regression by L-BFGS (deterministic): (weights…, bias)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    theta = torch.zeros(xb.shape[1], dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(xb @ theta, y, reduction="none")
                ).sum() / weight.sum() + l2 * (theta[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return theta.detach()


def pu_logistic(o: TeacherOutputs, seed: torch.Tensor, negatives: str) -> torch.Tensor:
    """Positives: the seed's top 5 %; negatives: all the others (P vs U, class-balanced) or its bottom 30 %.
    Returns the fitted logit of every image."""
    x = o.bn_grid.double()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    r = percentile_ranks(seed)
    positive = r > 1 - fitted.KEEP
    if negatives == "unlabelled":
        used = torch.ones(len(x), dtype=torch.bool)
        weight = torch.where(positive, 1.0 / positive.sum(), 1.0 / (~positive).sum()).double()
    else:
        used = positive | (r <= 0.3)
        weight = torch.ones(int(used.sum()), dtype=torch.float64)
    theta = _logistic_fit(x[used], positive[used].double(), weight)
    return x @ theta[:-1] + theta[-1]


def knn_to_seed(o: TeacherOutputs, seed: torch.Tensor, k: int = 10) -> torch.Tensor:
    x = o.bn_grid.float()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    reference = x[fitted.seed_indices(seed, fitted.KEEP, x.shape[1])]
    out = [torch.cdist(x[i:i + 2048], reference).topk(k + 1, largest=False).values[:, 1:].mean(1)
           for i in range(0, len(x), 2048)]
    return -torch.cat(out).double()


def flip_agreement(net: torch.nn.Module, images: torch.Tensor, normalize: Normalizer, o: TeacherOutputs) -> torch.Tensor:
    """−KL(p(clean) ‖ p(horizontally flipped)): a second teacher pass on mirrored images."""
    with torch.inference_mode():
        flipped = torch.cat([net(normalize(images[i:i + 1024].flip(3))).float() for i in range(0, len(images), 1024)])
    p, q = torch.log_softmax(o.logits, 1), torch.log_softmax(flipped, 1)
    return -(p.exp() * (p - q)).sum(1).double()


def per_layer_ensemble(net: torch.nn.Module, o: TeacherOutputs) -> torch.Tensor:
    """Lee et al.'s feature ensemble: the pick's fit on each BatchNorm layer's own 2×2-grid block, the
    layers' scores combined by mean percentile rank (instead of one Gaussian on all blocks at once)."""
    widths = [m.num_features * BN_GRID * BN_GRID for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seed = _seed(o)
    return mean_rank([maha_on(block, o, seed) for block in o.bn_grid.double().split(widths, dim=1)])


def flip_averaged(net: torch.nn.Module, images: torch.Tensor, normalize: Normalizer,
                  o: TeacherOutputs) -> torch.Tensor:
    """The pick on bn_grid averaged over the image and its mirror (a second teacher pass): agreement
    across augmented views, as a test-time average of the features the Gaussians see."""
    mirrored = teacher_outputs(net, images.flip(3), normalize)
    averaged = TeacherOutputs(o.logits, o.feature_l2, o.feature_l1, o.bn_distances, o.bn_layers,
                              (o.bn_grid.double() + mirrored.bn_grid.double()) / 2)
    return maha_on(averaged.bn_grid, averaged, _seed(o))


def inversion_invariant(net: torch.nn.Module, images: torch.Tensor, normalize: Normalizer,
                        o: TeacherOutputs) -> torch.Tensor:
    """max(pick on x, pick's Gaussians on 255 − x): exploratory only. The inverted view comes from the
    issue's list of failures (negatives in the hard variant), not from fashion-wild, so it is not eligible."""
    seed = _seed(o)
    chosen = fitted.seed_indices(seed, fitted.KEEP, o.bn_grid.shape[1])
    means, cholesky = fitted.fit_gaussians(o.bn_grid, o.logits.argmax(dim=1), chosen, fitted.SHRINK)
    inverted = teacher_outputs(net, 255 - images, normalize)
    clean = fitted.min_mahalanobis(o.bn_grid, means, cholesky)
    return -torch.minimum(clean, fitted.min_mahalanobis(inverted.bn_grid, means, cholesky))


def subclass_maha(o: TeacherOutputs, components: int = 3, iterations: int = 20) -> torch.Tensor:
    """The pick with ``components`` means per predicted class instead of one (k-means on the seed's images
    of that class, deterministic farthest-point start), one covariance tied over all of them: a class
    whose seed mixes styles (sketch, low-res, contrast) is not forced into one ellipsoid."""
    x, seed = o.bn_grid.double(), _seed(o)
    chosen = fitted.seed_indices(seed, fitted.KEEP, x.shape[1])
    prediction = o.logits.argmax(dim=1)
    labels = torch.empty(len(x), dtype=torch.long)
    for k in prediction[chosen].unique().tolist():
        members = chosen[prediction[chosen] == k]
        centres = [x[members].mean(0)]
        while len(centres) < min(components, len(members) // 2):
            far = torch.cdist(x[members], torch.stack(centres)).min(1).values.argmax()
            centres.append(x[members[far]])
        c = torch.stack(centres)
        for _ in range(iterations):
            assign = torch.cdist(x[members], c).argmin(1)
            c = torch.stack([x[members][assign == j].mean(0) if (assign == j).any() else c[j] for j in range(len(c))])
        labels[members] = k * components + torch.cdist(x[members], c).argmin(1)
    means, cholesky = fitted.fit_gaussians(x, labels, chosen, fitted.SHRINK)
    return -fitted.min_mahalanobis(x, means, cholesky)


def input_preprocessed(net: torch.nn.Module, images: torch.Tensor, normalize: Normalizer, o: TeacherOutputs,
                       epsilon: float = 0.01) -> torch.Tensor:
    """Lee et al. (NeurIPS 2018)'s input pre-processing for the Mahalanobis score: each image moved by
    ε · sign(∇ₓ score) (in normalised-input units) towards its closest Gaussian, then scored again;
    in-distribution images are expected to gain more than outliers. One forward + backward pass."""
    seed = _seed(o)
    chosen = fitted.seed_indices(seed, fitted.KEEP, o.bn_grid.shape[1])
    means, cholesky = fitted.fit_gaussians(o.bn_grid, o.logits.argmax(dim=1), chosen, fitted.SHRINK)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    grids: list[torch.Tensor] = []
    handles = [bn.register_forward_pre_hook(lambda m, inputs: grids.append(
        torch.nn.functional.adaptive_avg_pool2d(inputs[0], BN_GRID).flatten(1))) for bn in bns]
    white_means = torch.linalg.solve_triangular(cholesky, means.T, upper=False).T.float()

    def distance(x: torch.Tensor) -> torch.Tensor:
        grids.clear()
        net(x)
        white = torch.linalg.solve_triangular(cholesky.float(), torch.cat(grids, 1).T, upper=False).T
        return torch.cdist(white, white_means).pow(2).min(1).values

    out = []
    try:
        for i in range(0, len(images), 1024):
            x = normalize(images[i:i + 1024]).float().requires_grad_(True)
            distance(x).sum().backward()
            with torch.no_grad():
                out.append(-distance(x - epsilon * x.grad.sign()).double())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)


def failure_costs(score: np.ndarray, relevant: np.ndarray, source: np.ndarray,
                  style: np.ndarray) -> list[tuple[str, int, float, float]]:
    """What each group costs the overall AUROC: (group, images, AUROC if that group alone were ranked
    perfectly (relevant ones above every image, irrelevant ones below), AUROC without the group)."""
    overall_best = score.max() + 1.0, score.min() - 1.0
    rows = []
    groups = [(f"rel:{n}", relevant & (source == n), True) for n in sorted(set(source[relevant].tolist()))]
    groups += [(f"style:{n}", relevant & (style == n), True) for n in sorted(set(style[relevant].tolist()))]
    groups += [(f"src:{n}", ~relevant & (source == n), False) for n in sorted(set(source[~relevant].tolist()))]
    for name, members, is_relevant in groups:
        if is_relevant and members.sum() == relevant.sum():  # the whole relevant side: nothing to learn
            continue
        fixed = score.copy()
        fixed[members] = overall_best[0] if is_relevant else overall_best[1]
        kept = ~members
        rows.append((name, int(members.sum()), float(auroc(fixed, relevant)), float(auroc(score[kept], relevant[kept]))))
    return rows


# -- the search on fashion-wild: which teacher features to fit the Gaussians on, keep and shrink ---------------
def search_features(net: torch.nn.Module, images: torch.Tensor, normalize: Normalizer) -> dict[str, torch.Tensor]:
    """Per-image teacher features for the feature search (one pass with hooks; LeNet-5-BN's modules)."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    found: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        found.setdefault(name, []).append(value.float())

    def bn_hook(module: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        keep("grid4", torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))
        flat = x.flatten(2)
        gram = flat @ flat.transpose(1, 2) / flat.shape[2]
        upper = torch.triu_indices(x.shape[1], x.shape[1])
        keep("gram", gram[:, upper[0], upper[1]])
        y = torch.relu(torch.nn.functional.batch_norm(x, module.running_mean, module.running_var, module.weight,
                                                      module.bias, False, 0.0, module.eps))
        keep("relu", y.mean(dim=(2, 3)))

    handles = [bn.register_forward_pre_hook(bn_hook) for bn in bns]
    handles.append(net.classifier.register_forward_pre_hook(lambda m, inputs: keep("h", inputs[0].flatten(1))))
    first_fc = next((m for m in net.modules() if isinstance(m, torch.nn.Linear)), None)
    if first_fc is not None and first_fc is not net.classifier:
        handles.append(first_fc.register_forward_hook(lambda m, inputs, out: keep("fc1", out)))
    per_batch: list[dict[str, torch.Tensor]] = []
    try:
        with torch.inference_mode():
            for i in range(0, len(images), 1024):
                found.clear()
                net(normalize(images[i:i + 1024]))
                per_batch.append({k: torch.cat(v, dim=1) for k, v in found.items()})
    finally:
        for handle in handles:
            handle.remove()
    return {k: torch.cat([b[k] for b in per_batch]) for k in per_batch[0]}


def search(o: TeacherOutputs, net: torch.nn.Module, images: torch.Tensor, normalize: Normalizer,
           relevant: np.ndarray) -> list[tuple[str, float, float]]:
    """(what, AUROC, P@30) of the seeded class-conditional Mahalanobis fit, varying one thing at a time."""
    extra = search_features(net, images, normalize)
    seed = _seed(o)
    feature_sets = [
        ("penultimate h (classifier input, 84)", extra["h"]),
        ("logits (10)", o.logits),
        ("first fc layer output (120)", extra.get("fc1")),
        ("BN-input Gram matrices, upper triangles (157)", extra["gram"]),
        ("post-BN ReLU channel means (22)", extra["relu"]),
        ("BN-input channel means, 1×1 (22)", channel_means(o)),
        ("**BN-input channel means, 2×2 grid (88) = bn_grid**", o.bn_grid),
        ("BN-input channel means, 4×4 grid (352)", extra["grid4"]),
        ("2×2 grid + logits (98)", torch.cat([o.bn_grid.double(), o.logits.double()], dim=1)),
    ]
    rows = []

    def measure(what: str, score: torch.Tensor) -> None:
        s = score.double().numpy()
        rows.append((what, float(group_aurocs(s, relevant, relevant.astype(str), relevant.astype(str))["overall"]),
                     precision_recall(top_fraction(s, KEPT), relevant)[0]))

    for what, features in feature_sets:
        if features is not None:
            measure(f"features: {what}", maha_on(features, o, seed))
    for keep in (0.02, 0.03, 0.05, 0.10, 0.15, 0.20, 0.30):
        measure(f"keep {keep:.0%}{' (pick)' if keep == fitted.KEEP else ''}", maha_on(o.bn_grid, o, seed, keep=keep))
    for shrink in (0.0, 0.01, 0.1, 0.3, 1.0):
        chosen = fitted.seed_indices(seed, fitted.KEEP, o.bn_grid.shape[1])
        means, cholesky = fitted.fit_gaussians(o.bn_grid, o.logits.argmax(dim=1), chosen, shrink)
        measure(f"shrink λ = {shrink}{' (pick)' if shrink == fitted.SHRINK else ''}",
                -fitted.min_mahalanobis(o.bn_grid, means, cholesky))
    one_class = TeacherOutputs(o.logits[:, :1], o.feature_l2, o.feature_l1, o.bn_distances, o.bn_layers, o.bn_grid)
    measure("one Gaussian for all classes (no class means)", maha_on(o.bn_grid, one_class, seed))
    return rows


def candidates(net, images, normalize) -> list[tuple[str, str, Callable[[TeacherOutputs], torch.Tensor]]]:
    """(name, what it is, function) — the pick, issue 6's default, then runners-up and ablations."""
    return [
        (ISSUE6, "kd3's default until issue 11 (issue 6)", lambda o: compute_score(ISSUE6, o)),
        (PICK, "**pick**: class-conditional Mahalanobis of BN-input 2×2-grid channel means, fitted on the "
               "default's top 5 %", lambda o: compute_score(PICK, o)),
        ("max_softmax", "DFND's / KD³'s confidence", lambda o: compute_score("max_softmax", o)),
        ("maha, channel means (no grid)", "ablation: the same fit on per-channel BN-input means (1×1 grid)",
         lambda o: maha_on(channel_means(o), o, _seed(o))),
        ("maha, keep 2 %", "the fashion-wild peak of the keep sweep (2/3/5/10/15/20/30 %), not chosen",
         lambda o: maha_on(o.bn_grid, o, _seed(o), keep=0.02)),
        ("maha, keep 10 %", "keep sweep", lambda o: maha_on(o.bn_grid, o, _seed(o), keep=0.10)),
        ("maha, per-class seed", "each predicted class's top 5 % as seed", lambda o: maha_on(
            o.bn_grid, o, _seed(o), per_class_seed=True)),
        ("maha, 2nd round", "self-training: re-seeded from the pick's own top 5 %", lambda o: maha_on(
            o.bn_grid, o, compute_score(PICK, o))),
        (f"meanrank:{PICK}+energy+bn_mean_all", "rank combination with the seed's two components",
         lambda o: compute_score(f"meanrank:{PICK}+energy+bn_mean_all", o)),
        ("PU logistic, P vs U", "logistic regression on bn_grid: top 5 % vs all others, class-balanced",
         lambda o: pu_logistic(o, _seed(o), "unlabelled")),
        ("PU logistic, top vs bottom", "logistic regression on bn_grid: top 5 % vs bottom 30 %",
         lambda o: pu_logistic(o, _seed(o), "bottom")),
        ("kNN to seed", "mean distance to the 10 nearest seed images (standardised bn_grid)",
         lambda o: knn_to_seed(o, _seed(o))),
        ("flip agreement", "−KL between the teacher's clean and mirrored predictions (one more pass)",
         lambda o: flip_agreement(net, images, normalize, o)),
        ("maha, per-layer ensemble", "the pick's fit per BatchNorm layer, mean percentile rank over layers "
         "(Lee et al.'s feature ensemble)", lambda o: per_layer_ensemble(net, o)),
        ("maha, flip-averaged features", "the pick on bn_grid averaged over the image and its mirror (a second "
         "teacher pass)", lambda o: flip_averaged(net, images, normalize, o)),
        ("(exploratory) pick, inversion-invariant", "max of the pick on the image and, with the same Gaussians, "
         "on its negative 255 − x (a second teacher pass). NOT eligible: the inverted view answers the hard "
         "variant's negatives, known from the issue, not from fashion-wild", lambda o: inversion_invariant(
             net, images, normalize, o)),
        ("maha, 3 means per class", "the pick with 3 k-means sub-classes per predicted class (tied covariance)",
         subclass_maha),
        ("maha, input pre-processing", "Lee et al.'s input pre-processing: each image moved ε = 0.01 along "
         "the sign of the gradient that brings it closer to its Gaussian, then scored again", lambda o:
         input_preprocessed(net, images, normalize, o)),
    ]


def evaluate(label: str, builder: str, variant: str, size: int, teacher_file: str, with_search: bool) -> dict:
    pool = load_or_build_pool(builder, cache_dir(), size=size, irrelevant_fraction=0.7, variant=variant, seed=0)
    net, info = load_teacher(cache_dir() / "teachers" / teacher_file)
    normalize = Normalizer(tuple(info.mean), tuple(info.std))
    started = time.perf_counter()
    outputs = cached_teacher_outputs(pool, net, normalize, cache_dir())
    pass_s = time.perf_counter() - started
    relevant, source, style = pool.relevant.astype(bool), pool.source.astype(str), pool.style.astype(str)
    prediction = outputs.logits.argmax(dim=1)
    rows = {}
    for name, what, fn in candidates(net, pool.images[:], normalize):
        started = time.perf_counter()
        score = fn(outputs).double()
        seconds = time.perf_counter() - started
        s = score.numpy()
        kept = percentile_select(score, prediction, outputs.logits.shape[1], KEPT).indices.numpy()
        per_class = np.zeros(len(s), dtype=bool)
        per_class[kept] = True
        rows[name] = {"what": what, "seconds": seconds, "aurocs": group_aurocs(s, relevant, source, style),
                      "p30": precision_recall(top_fraction(s, KEPT), relevant)[0],
                      "pc30": precision_recall(per_class, relevant)[0]}
    seed = fitted.seed_indices(_seed(outputs), fitted.KEEP, outputs.bn_grid.shape[1]).numpy()
    seed_sources = {name: int((source[seed] == name).sum()) for name in sorted(set(source[seed].tolist()))}
    seed_styles = {name: int((style[seed][relevant[seed]] == name).sum())
                   for name in sorted(set(style[seed][relevant[seed]].tolist()))}
    costs = failure_costs(compute_score(PICK, outputs).double().numpy(), relevant, source, style)
    search_rows = search(outputs, net, pool.images[:], normalize, relevant) if with_search else []
    return {"label": label, "n": len(pool), "search": search_rows, "seed": (len(seed), float(relevant[seed].mean()), seed_sources,
                                                     seed_styles), "teacher": f"{teacher_file} (sha256 {info.sha256[:12]}, test "
            f"{100 * info.test_accuracy:.2f} %)", "pass_s": pass_s, "rows": rows, "costs": costs}


def other_pool_seeds(seeds: tuple[int, ...] = (1, 2)) -> list[tuple[int, dict[str, tuple[float, float]]]]:
    """Default and pick on fashion-wild drawn with other pool seeds: how much of a difference is noise."""
    net, info = load_teacher(cache_dir() / "teachers" / "fashion-lenet5_bn.pt")
    rows = []
    for seed in seeds:
        pool = load_or_build_pool("fashion-wild", cache_dir(), size=20000, irrelevant_fraction=0.7, variant="default",
                                  seed=seed)
        o = cached_teacher_outputs(pool, net, Normalizer(tuple(info.mean), tuple(info.std)), cache_dir())
        relevant = pool.relevant.astype(bool)
        found = {}
        for name in (ISSUE6, PICK):
            score = compute_score(name, o).double().numpy()
            found[name] = (group_aurocs(score, relevant, pool.source.astype(str), pool.style.astype(str))["overall"],
                           precision_recall(top_fraction(score, KEPT), relevant)[0])
        rows.append((seed, found))
    return rows


FINDINGS = """## What this shows

- **The target (AUROC ≥ 0.90 on all three pools without retuning) is not reached.** The pick reaches it on
  fashion-wild, where it was chosen (and on two other draws of that pool), and beats issue 6's default on all three
  pools, but stays below 0.90 on the hard variant and on digits-wild.
- **Why it works on fashion-wild.** Issue 6's score is wrong in the middle of its ranking, not at the
  top: its top 5 % is 93 % relevant (table above). A density fitted on those images, on features that see
  *where* activations are (the BN inputs' channel means per image quadrant), separates what the running
  BN statistics cannot: MNIST digits 0.59 → 0.93, glyphs 0.73 → 0.96. Without the spatial grid (channel
  means only) the same fit gives 0.905 and MNIST stays at 0.71.
- **Negatives (hard variant): worse than issue 6's default.** Inverted Fashion-MNIST is relevant by provenance
  but is as far from the seed as junk can be: style AUROC 0.02 (issue 6's 0.43), which alone costs the pool
  AUROC about 0.09 (the per-source columns of the hard variant fall for the same reason: every
  source is compared with all relevant images, negatives included). Every feature-density score here
  has this failure. The exploratory row that also scores
  the image's negative 255 − x (max of the two) lifts the hard variant to 0.885 (negatives 0.93) at a cost
  of 0.007 on fashion-wild; it is **not** eligible (the inverted view was designed from the issue's list of
  failures, not on fashion-wild), and is reported only to size the problem. MNIST-M-style blends (0.69)
  are the other hard-variant failure.
- **Letters (digits-wild): no better.** The seed is the problem there: issue 6's score's top 5 % is only 75 %
  relevant, 126 of its 500 images are letters and 2 are UCI digits, so the fitted Gaussians take printed
  letters as in-distribution and UCI scans as not (letters 0.55, UCI digits vs junk 0.76). A 10 % seed
  happens to give 0.931 on digits-wild but is worse on fashion-wild (0.940) and hard (0.791): choosing it
  would be tuning on digits-wild, so it is not the pick. P@30 on digits-wild is *lower* than issue 6's
  (0.534 vs 0.588), which is what DFND's global top 30 % keeps; Pc@30, KD³'s rule, is higher (0.649 vs
  0.617). (The digits-wild teacher here, sha256 fb1d11e05fd5, is the one the digits-wild bench of
  results/digits-wild.md used; an earlier session's teacher, 7764e38b2958, gave 0.861 / 0.803.)
- **Still short of 0.90 with the pick as the default** (issue 11's target for the default score):
  0.953 / 0.805 / 0.849 against issue 6's 0.840 / 0.785 / 0.831.

## Tried and dropped (all judged on fashion-wild)

- A per-BatchNorm-layer ensemble of the pick's fit (Lee et al.; mean percentile rank over layers): 0.954 on
  fashion-wild against the pick's 0.953, inside the pool-to-pool spread (0.953–0.965 over three pool draws), so
  not adopted; reported on the other pools above (0.811, 0.857) without having been chosen on them.
- Flip-averaged features (the pick on bn_grid averaged over the image and its mirror): 0.897, lower.
- Self-training rounds (re-seeding from the fitted score's own top 5 %): lower at round 2 on fashion-wild
  (0.943), and in earlier exploration (per-channel means, 10 % per-class seed) falling round after
  round: 0.881, 0.846, 0.780, 0.705: the seed
  drifts towards the junk the fit likes.
- Positive-unlabelled logistic regression on the same features (top 5 % vs all others class-balanced:
  0.916; top 5 % vs bottom 30 %: 0.850): the bottom of issue 6's score is noise/natural/faces, so a classifier
  learns to reject what that score already rejects, not MNIST/glyphs.
- k-NN distance to the seed (0.918), a per-class seed (0.922), a rank combination of the pick with the
  default's components (0.919: it dilutes the pick with the score it corrects).
- Other features for the same fit (table "The search"): the penultimate vector h, logits, the first fc
  layer, Gram matrices of the BN inputs, post-BN ReLU means, a 4×4 grid; all lower. Adding the logits to
  the 2×2 grid (0.957) was found after the pick was frozen and is within the pool-to-pool spread (other
  pool seeds above), so it was not adopted.
- Augmentation agreement (KL between the teacher's clean and flipped/shifted/inverted predictions):
  flip 0.725, ±2-pixel shift 0.54, inversion 0.39 on fashion-wild (exploration); flip is reported above.
- Keep fraction: AUROC rises as the seed shrinks (2 %: 0.963); 5 % was chosen, not the 2 % edge of the
  sweep, because at 2 % the fit has 400 images for 88 dimensions and the peak sits at the sweep's edge.

## Cost

One teacher pass as before (the 2×2 grid means are recorded by the same hooks: 88 float16 values, 176 bytes
per image for LeNet-5-BN; more than 256 values per image are randomly projected to 256); the fit and
scoring take well under a second for 20k images (column `s`). `SCORES_VERSION` is 2, so older score caches
are recomputed once; every existing score gives bit-identical numbers (checked on fashion-wild).
"""


def markdown(results: list[dict], command: str, seconds: float,
             seeds: list[tuple[int, dict[str, tuple[float, float]]]]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src/kd3/scores", "benchmarks/relevance_search.py"],
                           capture_output=True, text=True).stdout.strip()
    machine = f"{os.cpu_count()} cores, {cpu_model()}, {torch.get_num_threads()} torch thread(s), " \
              f"torch {torch.__version__}, CPU only"
    out = ["# Relevance scores that fail less (issue 11, item 3)", "",
           f"Command: `{command}`  ", f"Commit: {commit}{' (+ uncommitted changes to the score code)' if dirty else ''}  ",
           f"Machine: {machine}  ",
           f"Wall time: {seconds:.0f} s (all three pools, every candidate, the search and two more pool seeds; "
           "pools and teacher passes cached)", "",
           "Provenance (`pool.relevant`) is used only to measure AUROC / precision here, never inside a "
           "score. **Every design decision of the pick was made on fashion-wild (default variant) only**; "
           "the hard variant and digits-wild are reported unchanged.", "",
           f"**Pick: `{PICK}`** (registered in `kd3.scores`; kd3's default relevance score since issue 11): one Gaussian per "
           "teacher-predicted class, with a shared covariance shrunk 10 % towards its diagonal, fitted on the "
           "BatchNorm inputs' channel means over a 2×2 spatial grid (`TeacherOutputs.bn_grid`) of the top 5 % "
           f"of the pool by `{fitted.SEED_SCORE}`; score = minus the smallest Mahalanobis distance. "
           "Deterministic, no random draws, a pure function of the teacher pass (`kd3.scores.fitted`).", "",
           "Teachers are the ones in this machine's cache (sha256 below); they are not the exact files of "
           "results/selection.md (fashion b7bc9140db54, mnist5k a516e1d29a78), so issue 6's figures differ "
           "from there by up to 0.013.", ""]
    names = list(results[0]["rows"])
    out += ["## AUROC relevant vs irrelevant (overall), and precision at 30 % kept", "",
            "| score | " + " | ".join(f"{r['label']} AUROC | P@30 | Pc@30" for r in results) + " |",
            "|---|" + "---|---|---|" * len(results)]
    for name in names:
        cells = []
        for r in results:
            row = r["rows"][name]
            cells += [f"{row['aurocs']['overall']:.3f}", f"{row['p30']:.3f}", f"{row['pc30']:.3f}"]
        bold = name == PICK
        out.append(f"| {'**' + name + '**' if bold else name} | " + " | ".join(
            f"**{c}**" if bold else c for c in cells) + " |")
    out += ["", "P@30: precision of the global top 30 %; Pc@30: precision of KD³'s percentile rule (each "
            "teacher-predicted class keeps its top images within a 30 % budget). The pools are 30 % relevant, "
            "so 0.300 is chance and 1.000 perfect for both.", ""]
    for r in results:
        groups = [g for g in r["rows"][names[0]]["aurocs"] if g != "overall"]
        out += [f"### {r['label']}: per irrelevant source (`src:`) and per relevant style (`style:`)", "",
                f"{r['n']} images, teacher {r['teacher']}, teacher pass {r['pass_s']:.1f} s (cached after the "
                "first run).", "",
                "| score | " + " | ".join(groups) + " | s |", "|---|" + "---|" * (len(groups) + 1)]
        for name in names:
            row = r["rows"][name]
            out.append(f"| {name} | " + " | ".join(f"{row['aurocs'][g]:.2f}" for g in groups)
                       + f" | {row['seconds']:.2f} |")
        out.append("")
    out += ["## What each failure costs the pick", "",
            f"`{PICK}`'s overall AUROC if one group alone were ranked perfectly (a relevant style above every "
            "image, an irrelevant source below every image), and with that group left out of the pool: the "
            "ceiling a fix of that failure alone could reach.", "",
            "| pool | group | images | AUROC, group ranked perfectly | AUROC without the group |", "|---|---|---|---|---|"]
    for r in results:
        overall = r["rows"][PICK]["aurocs"]["overall"]
        out.append(f"| {r['label']} | (none: as measured) | {r['n']} | {overall:.3f} | {overall:.3f} |")
        out += [f"| {r['label']} | {g} | {n} | {fixed:.3f} | {without:.3f} |" for g, n, fixed, without in r["costs"]]
    out += ["", "## The search, on fashion-wild only", "",
            "The seeded class-conditional Mahalanobis fit of the pick, varying one choice at a time (the others as "
            "picked: bn_grid features, keep 5 %, λ = 0.1, global seed, one Gaussian per predicted class).", "",
            "| variant | AUROC | P@30 |", "|---|---|---|"]
    out += [f"| {what} | {a:.3f} | {p:.3f} |" for what, a, p in results[0]["search"]]
    out += ["", "## The pick's seed: issue 6's score's top 5 %, as provenance sees it", "",
            "| pool | seed images | relevant share | by source | relevant ones by style |", "|---|---|---|---|---|"]
    for r in results:
        count, share, by_source, by_style = r["seed"]
        out.append(f"| {r['label']} | {count} | {share:.3f} | "
                   + ", ".join(f"{k} {v}" for k, v in by_source.items()) + " | "
                   + ", ".join(f"{k} {v}" for k, v in by_style.items()) + " |")
    out += ["", "## Other draws of fashion-wild (pool seeds), issue 6's score vs pick", "",
            "| pool seed | issue 6 AUROC | issue 6 P@30 | pick AUROC | pick P@30 |", "|---|---|---|---|---|"]
    main = results[0]["rows"]
    out.append(f"| 0 (above) | {main[ISSUE6]['aurocs']['overall']:.3f} | {main[ISSUE6]['p30']:.3f} | "
               f"{main[PICK]['aurocs']['overall']:.3f} | {main[PICK]['p30']:.3f} |")
    for seed, found in seeds:
        out.append(f"| {seed} | {found[ISSUE6][0]:.3f} | {found[ISSUE6][1]:.3f} | {found[PICK][0]:.3f} | "
                   f"{found[PICK][1]:.3f} |")
    out += ["", FINDINGS, "## The candidates", ""] + [f"- `{name}`: {results[0]['rows'][name]['what']}" for name in names]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/relevance.md")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables-only", action="store_true", help="print the markdown, write nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = [evaluate(*pool, with_search=pool[0] == "fashion-wild") for pool in POOLS]
    seeds = other_pool_seeds()
    text = markdown(results, f"python benchmarks/relevance_search.py --threads {args.threads}",
                    time.perf_counter() - started, seeds)  # the wall time covers the pool-seed rows too
    if args.tables_only:
        print(text)
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
