"""DeepInversion: Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha, Kautz, "Dreaming to Distill:
Data-free Knowledge Transfer via DeepInversion", CVPR 2020.

Images are synthesised from the teacher alone by optimising pixels x (in the teacher's
normalised input space, starting from N(0, 1) noise) with Adam to minimise

    CE(T(x̃), y) + bn_weight · Σ_l (‖μ_l(x̃) − running_mean_l‖₂ + ‖σ²_l(x̃) − running_var_l‖₂)
                + tv_weight · TV(x̃) + l2_weight · ‖x̃‖₂

where x̃ is x after a random jitter (``torch.roll`` by up to ``jitter`` pixels each way) and, when
flips are on, a random horizontal flip, drawn anew every iteration; y are target classes (cycled
through the classes, as in the released CIFAR-10 script, or uniform at random); the BN term is
taken on the input of every ``BatchNorm2d`` of the teacher through forward hooks (``bn_hooks``),
with biased batch variance; TV is the sum of the ℓ2 norms of the horizontal, vertical and both
diagonal neighbour differences, and ‖x̃‖₂ the plain (not squared) ℓ2 norm of the batch, both as
in the released code (NVlabs/DeepInversion, cifar10/deepinversion_cifar10.py).

Defaults follow that script's "paper parameters" (Adam lr 0.05, bn_weight 10, tv_weight 2.5e-5,
l2_weight 0, jitter 2) except the number of iterations: the paper uses 2,000 per batch; the
default here is small (200) so that CPU runs stay feasible. After each step the pixels are
clipped to the range real images occupy (``clip``, as the released ImageNet code does); the
images are then stored as uint8, so the student sees them through the same augmentation and
normalisation as pool images.

The method keeps a bank of ``bank_batches`` synthesised batches: the first epoch fills it, and
every later epoch replaces the ``refresh_batches`` oldest batches before training. The student is
distilled on the bank with Hinton KD (``kd_loss``) against the teacher's logits on the augmented
bank images (``TeacherLogits``: a teacher forward per step by default, or cached fixed views).
The KD temperature is not given in what we read of the paper; kd3 uses blind KD's 4.

Not implemented: Adaptive DeepInversion (the student-teacher Jensen-Shannon competition term),
the ImageNet code's extra weight on the first BN layer, its multi-resolution schedule, and
keeping the lowest-loss iterate (the last iterate is kept).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kd3.methods.base import Batch, DistillContext, EpochPlan, Method, register_method
from kd3.methods.bn_hooks import BatchNormStatistics, batchnorm_layers
from kd3.methods.losses import kd_loss
from kd3.methods.teacher_outputs import TeacherLogits
from kd3.models.base import Net
from kd3.utils.progress import progress


@dataclass
class DeepInversionOptions:
    iterations: int = 200  # Adam steps per synthesised batch (paper: 2,000)
    lr: float = 0.05  # Adam learning rate on the pixels
    bn_weight: float = 10.0  # feature-statistics (BatchNorm) regulariser
    tv_weight: float = 2.5e-5  # total variation (ℓ2 of neighbour differences)
    l2_weight: float = 0.0  # ℓ2 norm of the images
    jitter: int = 2  # random roll of up to this many pixels, each iteration
    flip: bool | None = None  # random horizontal flips while synthesising; None follows augment.flip
    clip: bool = True  # keep pixels in the range of real images after every step
    random_targets: bool = False  # False cycles through the classes (balanced), True draws them at random
    bank_batches: int = 8  # synthesised batches kept for training
    refresh_batches: int = 2  # oldest batches replaced at the start of every epoch after the first
    synthesis_batch_size: int | None = None  # None: the training batch size
    steps_per_epoch: int | None = None  # None: pool_size // batch_size
    temperature: float = 4.0  # KD temperature for the student
    teacher_views: int = 0  # 0 runs the teacher every step; K>0 caches K fixed views of the bank per epoch


def image_priors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(total variation, ℓ2 norm) of a batch, as DeepInversion's released code computes them."""
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    tv = sum(torch.linalg.vector_norm(d) for d in diffs)
    return tv, torch.linalg.vector_norm(x)


@register_method
class DeepInversion(Method):
    name = "deepinversion"
    Options = DeepInversionOptions

    def __init__(self, student: Net, ctx: DistillContext, options: DeepInversionOptions):
        super().__init__(student, ctx, options)
        if not batchnorm_layers(self.teacher):
            raise ValueError(
                f"DeepInversion needs a teacher with BatchNorm layers; {type(self.teacher).__name__} has none; "
                "use a teacher with BatchNorm2d (lenet5_bn, lenet5_half_bn, cnn_bn, resnet8, ...)")
        if options.bank_batches < 1:
            raise ValueError(f"deepinversion bank_batches must be at least 1, got {options.bank_batches}")
        if not 0 <= options.refresh_batches <= options.bank_batches:
            raise ValueError("deepinversion refresh_batches must lie in [0, bank_batches], "
                             f"got {options.refresh_batches}")
        self.bank: torch.Tensor | None = None  # uint8, bank_batches·B × C×H×W, CPU
        self.next_refresh = 0  # bank batch replaced next (ring order: oldest first)
        self.synthesised_epoch = -1  # the epoch whose begin_epoch last synthesised
        self._teacher_logits: TeacherLogits | None = None
        self._metrics: dict[str, Any] = {}

    # -- synthesis -----------------------------------------------------------------------------
    @property
    def synthesis_batch_size(self) -> int:
        return self.options.synthesis_batch_size or self.ctx.batch_size

    def _pixel_range(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.ctx.normalize.mean.to(device), self.ctx.normalize.std.to(device)
        return (0 - mean) / std, (1 - mean) / std

    def targets(self, n: int) -> torch.Tensor:
        k = self.ctx.num_classes
        if self.options.random_targets:
            return torch.randint(0, k, (n,), device=self.ctx.device)
        return torch.arange(n, device=self.ctx.device) % k

    def inversion_losses(self, x: torch.Tensor, targets: torch.Tensor,
                         stats: BatchNormStatistics) -> dict[str, torch.Tensor]:
        """The loss terms on one (already jittered) batch; ``stats`` must be active."""
        logits = self.teacher(x)
        tv, l2 = image_priors(x)
        o = self.options
        losses = {"ce": F.cross_entropy(logits.float(), targets), "bn": stats.pop(), "tv": tv, "l2": l2}
        losses["total"] = losses["ce"] + o.bn_weight * losses["bn"] + o.tv_weight * tv + o.l2_weight * l2
        return losses

    def synthesize_batch(self, targets: torch.Tensor, iterations: int | None = None,
                         x: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Optimise a batch of pixels (normalised space) for ``targets``; returns (images, last losses)."""
        ctx, o = self.ctx, self.options
        teacher = self.teacher
        teacher.eval()  # BN must use (and never update) its running statistics
        iterations = o.iterations if iterations is None else iterations
        flip = ctx.augment.flip if o.flip is None else o.flip
        _, channels, height, width = ctx.images.shape
        if x is None:
            x = torch.randn(len(targets), channels, height, width, device=ctx.device)
        x = x.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=o.lr)
        low, high = self._pixel_range(x.device)
        last: dict[str, float] = {}
        with torch.enable_grad(), BatchNormStatistics(teacher) as stats:
            for iteration in range(iterations):
                shift = torch.randint(-o.jitter, o.jitter + 1, (2,)).tolist() if o.jitter > 0 else [0, 0]
                jittered = torch.roll(x, shifts=(shift[0], shift[1]), dims=(2, 3))
                if flip and bool(torch.rand(()) < 0.5):
                    jittered = torch.flip(jittered, dims=(3,))
                losses = self.inversion_losses(jittered, targets, stats)
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward(inputs=[x])
                optimizer.step()
                if o.clip:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, high), low))
                if iteration == iterations - 1:  # read values once: every read syncs a GPU
                    last = {k: float(v.detach()) for k, v in losses.items()}
        return x.detach(), last

    def synthesize(self, n_batches: int) -> tuple[torch.Tensor, dict[str, float]]:
        """``n_batches`` new batches as uint8 images on the CPU, plus summary metrics."""
        started = time.perf_counter()
        batches, sums, correct, total = [], {}, 0, 0
        for _ in progress(range(n_batches), desc="DeepInversion synthesis", enabled=self.ctx.progress):
            targets = self.targets(self.synthesis_batch_size)
            x, last = self.synthesize_batch(targets)
            images = self.ctx.normalize.denormalize(x)
            with torch.inference_mode():
                predicted = self.teacher(self.ctx.normalize(images)).argmax(dim=1)
            correct += int((predicted == targets).sum())
            total += len(targets)
            batches.append(images.cpu())
            for k, v in last.items():
                sums[k] = sums.get(k, 0.0) + v
        metrics = {f"di_synth_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        metrics["di_synth_teacher_hits"] = correct / max(total, 1)  # teacher predicts the target class
        metrics["di_synth_seconds"] = time.perf_counter() - started
        return torch.cat(batches), metrics

    # -- epochs --------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> EpochPlan:
        o, b = self.options, self.synthesis_batch_size
        self._metrics = {"di_synth_batches": 0}
        if self.bank is None:
            self.bank, self._metrics = self.synthesize(o.bank_batches)
            self._metrics["di_synth_batches"] = o.bank_batches
            self.next_refresh = 0
            self.synthesised_epoch = epoch
            self._teacher_logits = None
        elif epoch != self.synthesised_epoch and o.refresh_batches > 0:
            new, self._metrics = self.synthesize(o.refresh_batches)
            for i in range(o.refresh_batches):
                slot = (self.next_refresh + i) % o.bank_batches
                self.bank[slot * b:(slot + 1) * b] = new[i * b:(i + 1) * b]
            self._metrics["di_synth_batches"] = o.refresh_batches
            self.next_refresh = (self.next_refresh + o.refresh_batches) % o.bank_batches
            self.synthesised_epoch = epoch
            self._teacher_logits = None
        if self._teacher_logits is None:
            self._teacher_logits = TeacherLogits(dataclasses.replace(self.ctx, images=self.bank), o.teacher_views)
        self._metrics["di_bank_size"] = len(self.bank)
        steps = o.steps_per_epoch if o.steps_per_epoch is not None else self.ctx.pool_size // self.ctx.batch_size
        return EpochPlan(steps=max(1, steps))

    def training_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert self.bank is not None and self._teacher_logits is not None
        n = min(self.ctx.batch_size, len(self.bank))
        indices = torch.randperm(len(self.bank))[:n]
        bank_batch = Batch(indices=indices, images=self.bank[indices].to(self.ctx.device))
        x, teacher_logits = self._teacher_logits(bank_batch)
        return {"kd": kd_loss(self.student(x), teacher_logits, self.options.temperature)}

    # -- bookkeeping ---------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    def method_state(self) -> dict[str, Any]:
        if self.bank is None:
            return {}
        return {"bank": self.bank.clone(), "next_refresh": self.next_refresh,
                "synthesised_epoch": self.synthesised_epoch}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.bank = state["bank"].to(torch.uint8).cpu()
        self.next_refresh = int(state["next_refresh"])
        self.synthesised_epoch = int(state["synthesised_epoch"])
        self._teacher_logits = None
