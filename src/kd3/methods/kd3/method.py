"""KD³: Tang, Chen, Niu, Sugiyama, Gong, "Distribution Shift Matters for Knowledge Distillation with
Webly Collected Images", ICCV 2023 — implemented from docs/method.md, not from the released code.

Per epoch, ``begin_epoch`` rescores the whole pool and keeps the images whose blended
teacher/student confidence clears a class-adaptive threshold (§1). Per step, the student's last
feature map goes through a projector φ into the teacher's feature space; the student's logits are
the teacher's own pool + classifier on φ(F_S) (classifier sharing); the loss is a per-instance
weighted feature alignment to F_T (§2) plus λ · NT-Xent between each image and its
MixDistribution-perturbed version, for student and teacher embedding heads (§3).

Choices where docs/method.md (the released code) is silent (each documented at its option too):
- Empty selection: the epoch trains on the whole pool (a warning, and ``empty_selection`` in the
  metrics). Skipping the epoch could stall the run for good: once a(e) = 0 with clean scoring
  nothing would ever change the student again. The whole pool is the selection-off behaviour.
- Spatial mismatch: the larger map is average-pooled to the smaller size, student side before φ
  (so the deployed model does it too). A teacher whose ``pool`` needs its full map (LeNet's
  flatten + fc) then rejects a smaller student map at construction, with a clear error.
- ``sharing`` says what is shared. ``map`` (the default, as above): φ maps F_S to F_T's shape and the
  teacher's whole ``pool`` + ``classifier`` run on φ(F_S); for LeNet that is its fc stack. ``pooled``:
  φ (``PooledProjector``, a two-layer MLP) maps the student's own pooled vector pool_S(F_S) to the
  width of the teacher's, z_S = h_T(φ(pool_S(F_S))) shares only the teacher's last linear layer, and
  L_wfa aligns φ(pool_S(F_S)) with pool_T(F_T) (mean squared error over the vector). The paper's
  networks end in GAP + one linear layer, where sharing "the classifier" means exactly that layer; on
  such nets the two modes differ only in whether φ acts before or after the GAP.
- ``classifier_sharing: false`` keeps L_wfa through φ (a FitNets-style hint) and adds KL to the
  teacher on the student's own classifier, so the ablation removes only the sharing.
- The embedding heads read GAP(F) (Linear(C → d) in the spec), not the network's own ``pool``.
- The student's clean and perturbed batches are two forward passes (BatchNorm sees each alone).
- ``mix_location`` other than "input" perturbs the named student submodule's output through a
  forward hook; the teacher-side term then perturbs the teacher's input with the same π and λ
  (the option names a student stage, which the teacher does not have).
- ``selection_score`` other than "blended" (a ``kd3.scores`` name, higher = more relevant) replaces
  the blended confidence c_j in the threshold step only: the predicted class ŷ_j stays the blended
  one, so selection still follows the student. The score comes from the frozen teacher on clean
  views, so it is computed once per run. With it, ``thresholds: auto`` means ``percentile``
  (``selection.percentile_select``: ``keep_fraction`` of the pool at most, an equal share per
  predicted class, each class keeping its highest scores). ``thresholds: flexmatch`` with such a score
  applies τ_k to the score's pool percentile in (0, 1] instead of c_j, since τ needs a value on a
  probability-like scale. ``thresholds: percentile`` works on the blended confidence too.
- ``teacher_contrastive: false`` skips the teacher forward on x̃ and the E_T term. That term only
  trains E_T, which nothing else reads, so the student's weights are bit-identical either way
  (E_T is built in both cases; the teacher forward draws no random numbers).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd3.engine.distributed import map_rows
from kd3.methods.base import Batch, DistillContext, EpochPlan, Method, register_method
from kd3.methods.kd3.contrastive import EmbeddingHead, global_average, nt_xent
from kd3.methods.kd3.deploy import PooledSharedClassifierStudent, SharedClassifierStudent, probe_input, shared_classifier_logits, used_copy
from kd3.methods.kd3.mixdistribution import mix_distribution, sample_mix
from kd3.methods.kd3.projector import PooledProjector, Projector, common_size, pool_to
from kd3.methods.kd3.schedule import TeacherWeight
from kd3.methods.kd3.selection import Selection, blended_prediction, percentile_select, select
from kd3.methods.kd3.teacher_targets import TeacherTargets
from kd3.methods.kd3.weighting import WEIGHTINGS, get_weighting
from kd3.methods.losses import kd_loss
from kd3.models.base import Net
from kd3.scores import compute_score, percentile_ranks, resolve, teacher_outputs
from kd3.utils.progress import progress

SELECTION_VIEWS = ("augmented", "clean")
SHARING_MODES = ("map", "pooled")
THRESHOLD_RULES = ("auto", "flexmatch", "percentile")


@dataclass
class KD3Options:
    # §1 dynamic instance selection
    selection: bool = True  # off: train on the whole pool every epoch
    # augmented (released: a random crop+flip view, eval mode) or clean (teacher logits cached once)
    selection_view: str = "augmented"
    base_threshold: float = 0.95  # τ of the class-adaptive thresholds
    selection_score: str = "blended"  # blended (released) or a kd3.scores name (e.g. "default") in place of c_j
    thresholds: str = "auto"  # flexmatch (released), percentile, or auto: flexmatch for blended, else percentile
    keep_fraction: float = 0.3  # percentile thresholds: at most this share of the pool is selected
    teacher_weight_cutoff: float = 0.5  # a(e) = 0 from this fraction of the epochs on
    teacher_weight_horizon: float = 2 / 3  # fraction of the epochs where the a(e) curve reaches 0
    teacher_weight_sharpness: float = 5.0  # a(e) = 1 − exp(−sharpness · ((e+1)/horizon − 1)²)
    # §2 classifier sharing + weighted feature alignment
    classifier_sharing: bool = True  # off: student's own classifier + KL to the teacher (L_wfa kept)
    # map: φ(F_S) → teacher's pool + classifier; pooled: φ(pool_S(F_S)) → teacher's classifier only
    sharing: str = "map"
    kd_temperature: float = 4.0  # KL temperature, used only with classifier_sharing off
    weighting: str = "sigmoid"  # sigmoid(‖z_S − z_T‖₂) or uniform (w = 1)
    # §3 MixDistribution + instance alignment
    mixdistribution: bool = True  # off: no perturbed forward and no L_ia (λ = 0)
    mix_location: str = "input"  # input, or a student submodule name (e.g. "layer1") whose output is perturbed
    mix_alpha: float = 0.1  # λ ~ Beta(α, α), one per image
    mix_probability: float = 1.0  # share of batches perturbed (released: every batch)
    ia_weight: float = 0.001  # λ of L = L_wfa + λ · L_ia
    contrastive_temperature: float = 0.3  # τ_c of NT-Xent
    embedding_dim: int = 128
    teacher_contrastive: bool = True  # teacher-side NT-Xent (trains only E_T); off is exact for the student
    # cost
    teacher_views: int = 0  # K > 0: cache F_T (fp16) and z_T on K fixed views; 0: teacher forward every step
    teacher_cache_gb: float = 4.0  # a teacher cache larger than this is not built (teacher runs every step)

    def __post_init__(self) -> None:
        checks = [
            (self.selection_view in SELECTION_VIEWS, f"selection_view={self.selection_view!r}; valid: "
                                                     f"{', '.join(SELECTION_VIEWS)}"),
            (self.sharing in SHARING_MODES, f"sharing={self.sharing!r}; valid: {', '.join(SHARING_MODES)}"),
            (self.weighting in WEIGHTINGS, f"weighting={self.weighting!r}; valid: {', '.join(WEIGHTINGS)}"),
            (0 < self.base_threshold <= 1, f"base_threshold={self.base_threshold} must be in (0, 1]"),
            (self.thresholds in THRESHOLD_RULES,
             f"thresholds={self.thresholds!r}; valid: {', '.join(THRESHOLD_RULES)}"),
            (0 < self.keep_fraction <= 1, f"keep_fraction={self.keep_fraction} must be in (0, 1]"),
            (self.kd_temperature > 0, f"kd_temperature={self.kd_temperature} must be positive"),
            (self.mix_alpha > 0, f"mix_alpha={self.mix_alpha} must be positive"),
            (0 < self.mix_probability <= 1, f"mix_probability={self.mix_probability} must be in (0, 1]"),
            (self.ia_weight >= 0, f"ia_weight={self.ia_weight} must be non-negative"),
            (self.contrastive_temperature > 0,
             f"contrastive_temperature={self.contrastive_temperature} must be positive"),
            (self.embedding_dim >= 1, f"embedding_dim={self.embedding_dim} must be at least 1"),
            (self.teacher_views >= 0, f"teacher_views={self.teacher_views} must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"kd3 options: {message}")
        if self.selection_score != "blended":
            try:
                resolve(self.selection_score)
            except ValueError as error:
                raise ValueError(f"kd3 options: selection_score: {error} (or \"blended\")") from error

    @property
    def threshold_rule(self) -> str:
        """flexmatch or percentile, with ``auto`` resolved."""
        if self.thresholds != "auto":
            return self.thresholds
        return "flexmatch" if self.selection_score == "blended" else "percentile"


def probe_feature_shape(net: Net, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of ``net.features`` on images of ``image_shape``, from one eval-mode probe."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        feature_map = net.features(torch.zeros(1, *image_shape, device=next(net.parameters()).device))
    net.train(was_training)
    channels, height, width = feature_map.shape[1:]
    return channels, height, width


@register_method
class KD3(Method):
    name = "kd3"
    Options = KD3Options

    def __init__(self, student: Net, ctx: DistillContext, options: KD3Options):
        super().__init__(student, ctx, options)
        teacher = self.teacher
        self.image_shape = tuple(ctx.images.shape[1:])
        student_channels, *student_size = probe_feature_shape(student, self.image_shape)
        teacher_channels, *teacher_size = probe_feature_shape(teacher, self.image_shape)
        self.pooled_sharing = options.sharing == "pooled"
        # Built in a fixed order whatever the switches that follow, so paired ablations with the same
        # seed start from the same projector.
        self.projector: Projector | PooledProjector
        if self.pooled_sharing:
            # F_T at the teacher's own size (what teacher.pool reads); φ works on the pooled vectors,
            # whose widths are what each classifier reads.
            self.feature_shape = (teacher_channels, *teacher_size)
            self.projector = PooledProjector(student.classifier.in_features, teacher.classifier.in_features)
        else:
            size = common_size(tuple(student_size), tuple(teacher_size))
            self.feature_shape = (teacher_channels, *size)  # φ's output, what F_T is compared with
            if options.classifier_sharing:
                self._check_teacher_pool(size, tuple(teacher_size))
            self.projector = Projector(student_channels, teacher_channels, tuple(student_size), size)
        self.student_embedding: EmbeddingHead | None = None
        self.teacher_embedding: EmbeddingHead | None = None
        if options.mixdistribution:
            if options.mix_location != "input":
                self._check_mix_location(options.mix_location)
            self.student_embedding = EmbeddingHead(student_channels, options.embedding_dim)
            # Built even with teacher_contrastive off: same RNG draws, so the switch is exact.
            self.teacher_embedding = EmbeddingHead(teacher_channels, options.embedding_dim)
        self.weighting = get_weighting(options.weighting)
        self.teacher_weight = TeacherWeight.for_run(ctx.epochs, options.teacher_weight_cutoff,
                                                    options.teacher_weight_horizon, options.teacher_weight_sharpness)
        self.targets = TeacherTargets(ctx, options.teacher_views, self.feature_shape, options.teacher_cache_gb)
        self.clean_teacher_logits: torch.Tensor | None = None  # selection_view=clean: the pool's, once
        self.relevance: torch.Tensor | None = None  # selection_score's value per pool image, once
        self.selection_record: dict[str, Any] = {}  # the current selection (checkpointed in method_state)
        self.sums: dict[str, torch.Tensor] = {}  # per-epoch loss parts, as tensors (no sync per step)
        self.images_seen = 0
        self.steps = 0

    # -- construction checks ---------------------------------------------------------------------
    def _check_teacher_pool(self, size: tuple[int, int], teacher_size: tuple[int, int]) -> None:
        if size == teacher_size:
            return
        probe = torch.zeros(1, self.feature_shape[0], *size, device=next(self.teacher.parameters()).device)
        try:
            with torch.no_grad():
                shared_classifier_logits(self.teacher, probe)
        except RuntimeError as error:
            raise ValueError(
                f"kd3: the student's feature map is smaller than the teacher's ({size} < {teacher_size}) and the "
                f"teacher's pool cannot take the smaller map ({error}); choose a student whose last feature map is "
                f"at least {teacher_size}, or set classifier_sharing: false") from error

    def _check_mix_location(self, name: str) -> None:
        try:
            self.student.get_submodule(name)
        except AttributeError as error:
            stages = ", ".join(n for n, _ in self.student.named_children())
            raise ValueError(f"kd3 mix_location={name!r} is not a submodule of the student; use \"input\" or a "
                             f"submodule path (top-level: {stages})") from error

    # -- shared pieces ---------------------------------------------------------------------------
    def _student_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(F_S, φ(F_S), z_S); z_S through the teacher's pool + classifier unless sharing is off.
        With ``sharing: pooled`` the middle one is φ(pool_S(F_S)) and z_S = h_T of it."""
        student_map = self.student.features(x)
        if self.pooled_sharing:
            pooled = self.student.pool(student_map)
            projected = self.projector(pooled)
            if self.options.classifier_sharing:
                logits = self.teacher.classifier(projected)
            else:
                logits = self.student.classifier(pooled)
            return student_map, projected, logits
        projected = self.projector(student_map)
        if self.options.classifier_sharing:
            logits = shared_classifier_logits(self.teacher, projected)
        else:
            logits = self.student.classifier(self.student.pool(student_map))
        return student_map, projected, logits

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    # -- §1 selection ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _clean_teacher_logits(self) -> torch.Tensor:
        if self.clean_teacher_logits is None:
            ctx = self.ctx
            (self.clean_teacher_logits,) = map_rows(
                ctx.pool_size, ctx.batch_size,
                lambda start, stop: [self.teacher(ctx.normalize(ctx.images[start:stop].to(ctx.device))).float().cpu()],
                lambda starts: progress(starts, desc="kd3 teacher (clean)", enabled=ctx.progress))
        return self.clean_teacher_logits

    @torch.inference_mode()
    def _score_pool(self, teacher_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended (confidence, prediction) of every pool image; networks in eval mode. Streamed in
        batches, and sharded over ranks under torchrun (every rank gets the whole result)."""
        ctx = self.ctx
        clean = self.options.selection_view == "clean"
        # With a(e) = 0 the teacher's logits are multiplied by 0: skip the teacher pass.
        teacher_cache = self._clean_teacher_logits() if clean and teacher_weight > 0 else None
        was_training = self.training
        self.eval()

        def compute(start: int, stop: int) -> list[torch.Tensor]:
            images = ctx.images[start:stop].to(ctx.device)
            x = ctx.normalize(images if clean else ctx.augment(images))
            student_logits = self._student_outputs(x)[2].float()
            if teacher_weight == 0:
                teacher_logits = torch.zeros_like(student_logits)
            elif teacher_cache is not None:
                teacher_logits = teacher_cache[start:stop].to(ctx.device)
            else:
                teacher_logits = self.teacher(x)
            c, y = blended_prediction(teacher_logits, student_logits, teacher_weight)
            return [c.cpu(), y.cpu()]

        confidence, prediction = map_rows(ctx.pool_size, ctx.batch_size, compute,
                                          lambda starts: progress(starts, desc="kd3 selection", enabled=ctx.progress))
        self.train(was_training)
        return confidence, prediction

    def _relevance(self) -> torch.Tensor:
        """``selection_score`` of every pool image, from one teacher pass on clean views (the teacher is
        frozen, so it never changes during a run)."""
        if self.relevance is None:
            ctx = self.ctx
            outputs = teacher_outputs(self.teacher, ctx.images, ctx.normalize, ctx.batch_size, ctx.device,
                                      ctx.progress)
            self.relevance = compute_score(self.options.selection_score, outputs)
        return self.relevance

    def _select(self, confidence: torch.Tensor, prediction: torch.Tensor) -> Selection:
        options, num_classes = self.options, self.ctx.num_classes
        score = confidence if options.selection_score == "blended" else self._relevance()
        if options.threshold_rule == "percentile":
            return percentile_select(score, prediction, num_classes, options.keep_fraction)
        if options.selection_score != "blended":
            score = percentile_ranks(score)
        return select(score, prediction, num_classes, options.base_threshold)

    def begin_epoch(self, epoch: int) -> EpochPlan:
        self.sums, self.images_seen, self.steps = {}, 0, 0
        everything = torch.arange(self.ctx.pool_size)
        if not self.options.selection:
            self.selection_record = {"epoch": epoch, "indices": everything, "selected": len(everything)}
            return EpochPlan(indices=everything)
        weight = self.teacher_weight(epoch)
        selection = self._select(*self._score_pool(weight))
        indices = selection.indices
        if selection.empty:
            warnings.warn(f"kd3 epoch {epoch + 1}: no pool image cleared its class threshold; training on the "
                          "whole pool this epoch", RuntimeWarning, stacklevel=2)
            indices = everything
        self.selection_record = {
            "epoch": epoch, "indices": indices, "selected": len(selection.indices), "teacher_weight": weight,
            "empty_selection": selection.empty,
            "predicted_per_class": selection.predicted_per_class.tolist(),
            "selected_per_class": selection.selected_per_class.tolist(),
            "class_thresholds": selection.thresholds.tolist(),
        }
        return EpochPlan(indices=indices)

    # -- §2 + §3 training ------------------------------------------------------------------------
    def training_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None, "kd3 trains on pool images"
        options = self.options
        x, teacher_map, teacher_logits = self.targets(batch)
        student_map, projected, student_logits = self._student_outputs(x)
        weights = self.weighting(student_logits, teacher_logits)
        if self.pooled_sharing:
            with torch.no_grad():  # the teacher is frozen; a cached F_T is fp16
                target = self.teacher.pool(teacher_map.to(self.teacher.classifier.weight.dtype)).float()
            per_image = (projected.float() - target).pow(2).mean(dim=1)
        else:
            target = pool_to(teacher_map, self.projector.size).float()
            per_image = (projected.float() - target).pow(2).mean(dim=(1, 2, 3))
        losses = {"wfa": (weights * per_image).mean()}
        if not options.classifier_sharing:
            losses["kd"] = kd_loss(student_logits, teacher_logits, options.kd_temperature)
        self._add("weight", weights.sum())
        self._add("feature_mse", per_image.sum())
        self.images_seen += len(batch.indices)
        self.steps += 1
        if options.mixdistribution:
            losses["ia"] = options.ia_weight * self._instance_alignment(x, student_map, teacher_map)
        return losses

    def _instance_alignment(self, x: torch.Tensor, student_map: torch.Tensor,
                            teacher_map: torch.Tensor) -> torch.Tensor:
        """L_ia = NT-Xent(student views) [+ NT-Xent(teacher views)], unweighted."""
        options = self.options
        assert self.student_embedding is not None and self.teacher_embedding is not None
        params = sample_mix(x.shape[0], options.mix_alpha, options.mix_probability)
        if options.mix_location == "input":
            perturbed_map = self.student.features(mix_distribution(x, params))
        else:
            stage = self.student.get_submodule(options.mix_location)
            handle = stage.register_forward_hook(lambda module, inputs, output: mix_distribution(output, params))
            try:
                perturbed_map = self.student.features(x)
            finally:
                handle.remove()
        loss = nt_xent(self.student_embedding(global_average(student_map)),
                       self.student_embedding(global_average(perturbed_map)), options.contrastive_temperature)
        self._add("ia_student", loss)
        if options.teacher_contrastive:
            with torch.no_grad():  # the teacher is frozen; eval mode, so this draws no random numbers
                perturbed_teacher = self.teacher.features(mix_distribution(x, params))
            teacher_loss = nt_xent(self.teacher_embedding(global_average(teacher_map)),
                                   self.teacher_embedding(global_average(perturbed_teacher)),
                                   options.contrastive_temperature)
            self._add("ia_teacher", teacher_loss)
            loss = loss + teacher_loss
        return loss

    # -- what is shipped and logged --------------------------------------------------------------
    def deployable(self) -> nn.Module:
        if not self.options.classifier_sharing:
            probe = probe_input((2, *self.image_shape), next(self.student.parameters()).device)
            return used_copy(self.student, lambda net: net(probe))
        if self.pooled_sharing:
            return PooledSharedClassifierStudent(self.student, self.projector, self.teacher, self.image_shape)
        return SharedClassifierStudent(self.student, self.projector, self.teacher, self.image_shape,
                                       self.feature_shape)

    def epoch_metrics(self) -> dict[str, Any]:
        metrics = {k: v for k, v in self.selection_record.items() if k not in ("epoch", "indices")}
        if self.images_seen:
            metrics["mean_weight"] = self.sums["weight"].item() / self.images_seen
            metrics["feature_mse"] = self.sums["feature_mse"].item() / self.images_seen
        for name in ("ia_student", "ia_teacher"):
            if name in self.sums:
                metrics[name] = self.sums[name].item() / self.steps
        return metrics

    def method_state(self) -> dict[str, Any]:
        return {"selection": dict(self.selection_record)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.selection_record = dict(state.get("selection", {}))
