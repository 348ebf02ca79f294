"""DFND: Chen, Guo, Xu, Li, Xu, Xu, Wang, "Learning Student Networks in the Wild", CVPR 2021.

Data-Free Noisy Distillation, as in the paper and the authors' released script
(huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DFND):

1. **Selection, once.** The teacher scores every pool image on a clean view (no augmentation):
   s_j = CE(z_T(x_j), argmax z_T(x_j)), lower = more confident. The N lowest-scoring images are
   kept for the whole run (``keep`` images, or ``keep_fraction`` of the pool). ``score=
   "max_softmax"`` ranks by the teacher's top softmax probability instead; since the cross-entropy
   against the argmax equals −log of that probability, both give the same ranking (ties aside)
   and only the logged score differs. Any other ``kd3.scores`` name (``energy``, ``feature_norm``,
   ``bn_meanlogvar_late``, ``minrank:...``, ``default``, ...) keeps the N images with the highest
   relevance score instead (logged negated, so lower = kept first for every option). All scores
   come from one teacher pass on clean views (``kd3.scores.teacher_outputs``). With ``per_class``
   each teacher-predicted class keeps the first-ranked of its own images up to an equal share of
   the budget (``percentile_select_count``, KD³'s class-adaptive rule), so a class that absorbs the
   pool's junk cannot crowd the others out. With ``budget="relative_density"`` (a kd3 addition,
   issue 22) N is not fixed but read off the pool: N = round(ŝ · pool size), ŝ the share of images
   whose density ratio favours "relevant" (``kd3.scores.share.relative_density``: the seeded
   class-conditional fit of ``bn_grid_maha`` against one Gaussian fitted on the whole pool, Ren et
   al.'s relative Mahalanobis); ``score`` still decides which N images are kept. ``keep`` and
   ``keep_fraction`` are then unused. The estimate is logged (``dfnd_estimated_share``). ``favoured_only``
   (any budget) also drops the kept images whose own log ratio is ≤ 0 (what a per-class share fills its
   classes with once their favoured images run out), so the kept set can end up smaller than N.
   ``rest_share`` (a kd3 addition, issue 22) puts a floor under the dropped images' weight: each epoch
   trains on the kept images plus a fresh random draw of the dropped ones, sized so that the draw is
   ``rest_share`` of the epoch's images (all of them when there are fewer), so a pool whose "junk" still
   teaches the student is not cut off from it. The draw is a function of (seed, epoch), so a resumed run
   and every rank draw the same images. ``whole_pool_epochs`` (a kd3 addition, issue 22) trains the first
   N epochs on the whole pool, as blind KD does, and only then on the kept images: features learnt from
   everything first, the selection's focus after.
2. **Training** on the kept images (and the epoch's draw) with
   L = KD_T(z_S, z_T) + noise_weight · NLL(log(Qᵀ softmax(z_S)), argmax z_T)
   where Q (K×K) is a noise-adaptation (class-transition) matrix, Q_ik = P(teacher says k | true
   class i): every row is a distribution, the diagonal is fixed to the teacher's accuracy a and
   the off-diagonal mass 1 − a of each row is learned (a softmax over K−1 free logits per row,
   initialised uniform). The diagonal therefore holds by construction after any optimiser step.

Where kd3 departs from the released code, and why:
- The released code fixes a to the teacher's accuracy on the original *test* set (hard-coded
  constants, e.g. 0.9523 for its CIFAR-10 ResNet-34). kd3 never looks at that test set, so a is
  the ``teacher_accuracy`` option when given, else the teacher's validation accuracy on its own
  held-out data (recorded in its checkpoint, passed as ``ctx.teacher_accuracy``), and otherwise
  estimated as the teacher's mean top-softmax probability on the kept images (its expected
  accuracy there if it were calibrated). The estimate is clamped to
  [1/K, 1]. On a pool where the teacher is over-confident this makes Q close to the identity.
  ``accuracy_from: kept`` (a kd3 addition, issue 22) uses that estimate even when the checkpoint
  records a validation accuracy: the labels Q models are the teacher's on the *kept pool images*,
  where it is less accurate than on its own data (digits-wild: validation 0.988, mean confidence
  on the kept images 0.845).
- The released code trains Q with its own Adam (lr 1e-3); here Q's logits are ordinary
  trainable parameters of the method, stepped by the trainer's optimizer with the student.
- Teacher outputs on the augmented training views come from ``TeacherLogits`` (K fixed views with
  cached logits, or a teacher forward per step with ``teacher_views: 0``), built over the kept
  images only (over the whole pool with ``rest_share`` or ``whole_pool_epochs``). The teacher label of
  the noise term is the argmax on the same view.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd3.data.mixing import Mixing
from kd3.data.storage import take
from kd3.methods.base import Batch, DistillContext, EpochPlan, Method, register_method
from kd3.methods.kd3.selection import percentile_select_count
from kd3.methods.losses import kd_loss
from kd3.methods.teacher_outputs import TeacherLogits, check_mixing
from kd3.models.base import Net
from kd3.scores import TeacherOutputs, compute_score, fitted, resolve, teacher_outputs
from kd3.scores.share import relative_density

BUDGETS = ("fixed", "relative_density")
ACCURACY_SOURCES = ("checkpoint", "kept")


@dataclass
class DFNDOptions:
    keep: int | None = None  # number of pool images kept; overrides keep_fraction
    keep_fraction: float = 0.3  # share of the pool kept when keep is not set
    budget: str = "fixed"  # fixed (keep / keep_fraction) | relative_density (the pool's estimated relevant share)
    per_class: bool = False  # each teacher-predicted class keeps its equal share of the budget (KD³'s percentile rule)
    # of the images the budget keeps, drop those whose density ratio (kd3.scores.share) does not favour "relevant"
    # (log ratio ≤ 0), which a per-class share fills its classes with when their relevant images run out
    favoured_only: bool = False
    # share of each epoch's images drawn afresh from those the selection drops (a floor under their weight; 0: none)
    rest_share: float = 0.0
    whole_pool_epochs: int = 0  # the first N epochs train on the whole pool, the rest on the selection
    score: str = "cross_entropy"  # cross_entropy (paper), or a kd3.scores name (max_softmax: same ranking)
    temperature: float = 4.0  # KD temperature (released code: 4)
    noise_weight: float = 1.0  # weight of the noise-adaptation term (released code: 1)
    teacher_accuracy: float | None = None  # diagonal of Q; None: from accuracy_from
    # where Q's diagonal comes from without teacher_accuracy: the teacher checkpoint's validation accuracy
    # (checkpoint; estimated from the kept images when it records none) or its confidence on the kept images (kept)
    accuracy_from: str = "checkpoint"
    teacher_views: int = 8  # fixed augmented views with cached teacher logits; 0 runs the teacher every step
    mix: str = "none"  # none | mixup | cutmix among the kept images (kd3.data.mixing; needs teacher_views: 0)
    mix_alpha: float = 1.0  # Beta(α, α) of the mixing weight


def check_score(score: str) -> None:
    if score != "cross_entropy":
        try:
            resolve(score)
        except ValueError as error:
            raise ValueError(f"DFND score={score!r}: use cross_entropy (the paper's) or a kd3.scores name; "
                             f"{error}") from error


def teacher_scores(ctx: DistillContext, score: str = "cross_entropy",
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every pool image on its clean view: (score, lower = kept first; max softmax; argmax)."""
    check_score(score)
    assert ctx.teacher is not None
    return ranking_of(teacher_outputs(ctx.teacher, ctx.images, ctx.normalize, chunk, ctx.device, ctx.progress), score)


def ranking_of(outputs: TeacherOutputs, score: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``teacher_scores`` from an existing teacher pass."""
    top_log_p, labels = F.log_softmax(outputs.logits, dim=1).max(dim=1)
    # CE(z, argmax z) = −log max softmax; relevance scores are higher = more relevant, hence negated.
    ranking = -top_log_p if score == "cross_entropy" else -compute_score(score, outputs)
    return ranking, top_log_p.exp(), labels


class NoiseAdaptation(nn.Module):
    """Q (K×K), rows are distributions, diagonal fixed to ``diagonal``, off-diagonals learned."""

    def __init__(self, num_classes: int, diagonal: float = float("nan")):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"noise adaptation needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.logits = nn.Parameter(torch.zeros(num_classes, num_classes - 1))
        self.register_buffer("diagonal", torch.tensor(float(diagonal)))
        self.register_buffer("off_mask", ~torch.eye(num_classes, dtype=torch.bool), persistent=False)

    def set_diagonal(self, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"the diagonal of the noise-adaptation matrix must lie in (0, 1], got {value}")
        self.diagonal.fill_(value)

    def matrix(self) -> torch.Tensor:
        k = self.num_classes
        off = F.softmax(self.logits.float(), dim=1) * (1 - self.diagonal)
        q = torch.diag_embed(self.diagonal.expand(k)).to(off.dtype)
        # Row-major order of the off-diagonal entries matches the K×(K−1) logits row by row.
        return q.masked_scatter(self.off_mask, off)

    def forward(self, student_probs: torch.Tensor) -> torch.Tensor:
        """Noisy-label probabilities Qᵀ p for each row p of ``student_probs`` (i.e. p @ Q), in float32
        even under autocast (their log is taken next)."""
        with torch.autocast(device_type=student_probs.device.type, enabled=False):
            return student_probs.float() @ self.matrix()


@register_method
class DFND(Method):
    name = "dfnd"
    Options = DFNDOptions

    def __init__(self, student: Net, ctx: DistillContext, options: DFNDOptions):
        super().__init__(student, ctx, options)
        self.teacher  # noqa: B018  (fails early, with a clear message, when the run has no teacher)
        check_score(options.score)
        self.mixing = Mixing(options.mix, options.mix_alpha)
        check_mixing(self.mixing, options.teacher_views)  # now, not after the selection pass
        if options.budget not in BUDGETS:
            raise ValueError(f"DFND budget={options.budget!r}: use one of {', '.join(BUDGETS)}")
        if options.keep is None and not 0.0 < options.keep_fraction <= 1.0:
            raise ValueError(f"DFND keep_fraction must lie in (0, 1], got {options.keep_fraction}")
        if not 0.0 <= options.rest_share < 1.0:
            raise ValueError(f"DFND rest_share must lie in [0, 1), got {options.rest_share}: the share of each "
                             "epoch's images drawn from those the selection drops (0 trains on the kept ones only)")
        if options.whole_pool_epochs < 0:
            raise ValueError(f"DFND whole_pool_epochs must be 0 or more, got {options.whole_pool_epochs}")
        if options.keep is not None and options.keep < 1:
            raise ValueError(f"DFND keep must be at least 1, got {options.keep}")
        if options.accuracy_from not in ACCURACY_SOURCES:
            raise ValueError(f"DFND accuracy_from={options.accuracy_from!r}: use one of {', '.join(ACCURACY_SOURCES)}")
        if options.teacher_accuracy is not None and not 0.0 < options.teacher_accuracy <= 1.0:
            raise ValueError(f"DFND teacher_accuracy must lie in (0, 1], got {options.teacher_accuracy}")
        self.noise = NoiseAdaptation(ctx.num_classes)
        self.kept: torch.Tensor | None = None  # pool indices, ascending
        self.kept_scores: torch.Tensor | None = None
        self.kept_labels: torch.Tensor | None = None
        self.estimated_share: float | None = None  # budget=relative_density: the pool's estimated relevant share
        self._teacher_logits: TeacherLogits | None = None
        self._position: torch.Tensor | None = None
        self.rest_drawn = 0  # images of this epoch drawn from those the selection drops (rest_share)

    # -- selection -----------------------------------------------------------------------------
    def keep_count(self) -> int:
        n = self.ctx.pool_size
        if self.estimated_share is not None:
            count = round(self.estimated_share * n)
        else:
            count = self.options.keep if self.options.keep is not None else round(self.options.keep_fraction * n)
        return max(1, min(n, count))

    def select(self) -> None:
        assert self.ctx.teacher is not None
        outputs = teacher_outputs(self.ctx.teacher, self.ctx.images, self.ctx.normalize, 1024, self.ctx.device,
                                  self.ctx.progress)
        scores, confidence, labels = ranking_of(outputs, self.options.score)
        estimate = None
        if self.options.budget == "relative_density" or self.options.favoured_only:
            estimate = relative_density(outputs, compute_score(fitted.SEED_SCORE, outputs))
        if self.options.budget == "relative_density":
            self.estimated_share = estimate.share
        if self.options.per_class:
            # percentile_select_count keeps the highest scores; DFND's ranking is lower = kept first.
            self.kept = percentile_select_count(-scores, labels, self.ctx.num_classes, self.keep_count()).indices
        else:
            self.kept = torch.sort(scores, stable=True).indices[: self.keep_count()].sort().values
        if self.options.favoured_only and estimate is not None:
            self.kept = self.kept[estimate.llr[self.kept] > 0]
        if estimate is not None and len(self.kept) < self.ctx.batch_size:
            # The kept count is the pool's, so preflight could not refuse it; a run on less than one batch would
            # train on almost nothing and blame its at-chance student on the learning rate.
            raise ValueError(
                f"DFND (budget={self.options.budget}, favoured_only={str(self.options.favoured_only).lower()}) keeps "
                f"{len(self.kept)} of {self.ctx.pool_size} pool images (estimated relevant share {estimate.share:.3f}), "
                f"fewer than one batch (train.batch_size={self.ctx.batch_size}); use a bigger pool, a smaller "
                "train.batch_size, or method.budget=fixed method.favoured_only=false with method.keep_fraction")
        self.kept_scores = scores[self.kept]
        self.kept_labels = labels[self.kept]
        if self.options.teacher_accuracy is not None:
            accuracy = self.options.teacher_accuracy
        elif self.ctx.teacher_accuracy is not None and self.options.accuracy_from == "checkpoint":
            accuracy = self.ctx.teacher_accuracy
        else:
            accuracy = float(confidence[self.kept].mean().clamp(1.0 / self.ctx.num_classes, 1.0))
        self.noise.set_diagonal(accuracy)

    def _prepare_training_views(self) -> None:
        assert self.kept is not None
        if self.options.rest_share > 0 or self.options.whole_pool_epochs > 0:
            self._teacher_logits = TeacherLogits(self.ctx, self.options.teacher_views, self.mixing)
            self._position = torch.arange(self.ctx.pool_size)
            return
        sub_ctx = dataclasses.replace(self.ctx, images=take(self.ctx.images, self.kept))
        self._teacher_logits = TeacherLogits(sub_ctx, self.options.teacher_views, self.mixing)
        self._position = torch.full((self.ctx.pool_size,), -1, dtype=torch.long)
        self._position[self.kept] = torch.arange(len(self.kept))

    def rest_draw(self, epoch: int) -> torch.Tensor:
        """The epoch's random draw of the images the selection drops: rest_share of the epoch's images."""
        assert self.kept is not None
        share = self.options.rest_share
        dropped = torch.ones(self.ctx.pool_size, dtype=torch.bool)
        dropped[self.kept] = False
        rest = dropped.nonzero().squeeze(1)
        count = min(len(rest), round(share / (1.0 - share) * len(self.kept)))
        # Seeded by (seed, epoch), not the global RNG: a resumed run and every rank draw the same images.
        generator = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + epoch)
        return rest[torch.randperm(len(rest), generator=generator)[:count]]

    def begin_epoch(self, epoch: int) -> EpochPlan:
        if self.kept is None:
            self.select()
        if self._teacher_logits is None:
            self._prepare_training_views()
        assert self.kept is not None
        if epoch < self.options.whole_pool_epochs:
            return EpochPlan(indices=torch.arange(self.ctx.pool_size))
        if self.options.rest_share == 0:
            return EpochPlan(indices=self.kept.clone())
        drawn = self.rest_draw(epoch)
        self.rest_drawn = len(drawn)
        return EpochPlan(indices=torch.cat([self.kept, drawn]).sort().values)

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None and self._teacher_logits is not None and self._position is not None
        positions = self._position[batch.indices.cpu()]
        if (positions < 0).any():
            raise ValueError("DFND got a batch with pool images outside its fixed selection")
        x, teacher_logits = self._teacher_logits(Batch(indices=positions, images=batch.images))
        student_logits = self.student(x)
        teacher_labels = teacher_logits.argmax(dim=1)
        noisy = self.noise(F.softmax(student_logits.float(), dim=1))
        noise_loss = F.nll_loss(torch.log(noisy.clamp_min(1e-12)), teacher_labels)
        return {
            "kd": kd_loss(student_logits, teacher_logits, self.options.temperature),
            "noise": self.options.noise_weight * noise_loss,
        }

    # -- bookkeeping ---------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, Any]:
        if self.kept is None:
            return {}
        with torch.no_grad():
            q = self.noise.matrix()
            off = q[self.noise.off_mask]
        assert self.kept_scores is not None and self.kept_labels is not None
        return {
            "dfnd_kept": len(self.kept),
            "dfnd_score_cutoff": float(self.kept_scores.max()),
            "dfnd_kept_per_class": torch.bincount(self.kept_labels, minlength=self.ctx.num_classes).tolist(),
            "dfnd_q_diagonal": float(self.noise.diagonal),
            "dfnd_q_offdiag_max": float(off.max()),
            **({"dfnd_rest_drawn": self.rest_drawn} if self.options.rest_share > 0 else {}),
            **({} if self.estimated_share is None else {"dfnd_estimated_share": self.estimated_share}),
        }

    def method_state(self) -> dict[str, Any]:
        if self.kept is None:
            return {}
        return {"kept": self.kept.clone(), "kept_scores": self.kept_scores.clone(),
                "kept_labels": self.kept_labels.clone(), "teacher_accuracy": float(self.noise.diagonal),
                **({} if self.estimated_share is None else {"estimated_share": self.estimated_share})}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.kept = state["kept"].long().cpu()
        self.kept_scores = state["kept_scores"].cpu()
        self.kept_labels = state["kept_labels"].long().cpu()
        self.noise.set_diagonal(float(state["teacher_accuracy"]))
        self.estimated_share = state.get("estimated_share")
        self._teacher_logits = None
