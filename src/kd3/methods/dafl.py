"""DAFL: Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu, Tian, "Data-Free Learning of Student Networks",
ICCV 2019.

A generator G is trained against the fixed teacher T so that T treats its images like real
ones; the student is distilled on G's images. Per step, with z ~ N(0, I) (``latent_dim`` = 100),
x = G(z), teacher logits z_T = T(x), teacher pooled features f_T (the vector before T's last
linear layer) and ŷ = argmax z_T:

    L_oh = CE(z_T, ŷ)                                   one-hot loss
    L_a  = −mean |f_T|                                  activation loss (ℓ1 of f_T, averaged)
    L_ie = Σ_k p̄_k log p̄_k,  p̄ = mean_batch softmax(z_T)   −(information entropy) of the batch mean
    L_G  = L_oh + α L_a + β L_ie,   α = 0.1, β = 5 (paper and released code)

G is stepped with its own Adam (released code: lr 0.2 for MNIST, 0.02 for CIFAR) inside
``training_step``; its parameters are kept out of ``trainable_parameters()``. In the same step
the student is distilled on the same batch, detached: L_S = KD(S(x), z_T) with temperature 1
by default (the paper's cross-entropy to the teacher's softmax; the released code's ``kdloss`` has
no temperature). Only L_S is returned to the trainer; the generator losses go to the epoch log.

Details taken from the released code (huawei-noah/Efficient-Computing,
Data-Efficient-Model-Compression/DAFL/DAFL-train.py) where the paper is silent:
- the entropy uses log base 10 (``entropy_log10``; β = 5 was tuned with it);
- the generator architecture (see ``generators.DAFLGenerator``), including the final affine-free
  BatchNorm that puts images in the teacher's standardised input space (``output="batchnorm"``);
  ``output="pixels"`` maps tanh to [0, 1] pixels and normalises them with the teacher's statistics;
- generator in train mode (BatchNorm with batch statistics), one generator step per student step.
The pool's contents are never used: its size only sets the default number of steps per epoch
(pool_size // batch_size), so that DAFL sees as many images per epoch as a pool method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd3.methods.base import Batch, DistillContext, EpochPlan, Method, register_method
from kd3.methods.generators import DAFLGenerator
from kd3.methods.losses import kd_loss
from kd3.models.base import Net


@dataclass
class DAFLOptions:
    latent_dim: int = 100
    generator_width: int = 128  # channels of the first conv block (the second has half)
    generator_lr: float = 0.2  # Adam; released code: 0.2 (MNIST), 0.02 (CIFAR)
    generator_output: str = "batchnorm"  # batchnorm (released code) or pixels; see generators.py
    one_hot_weight: float = 1.0
    activation_weight: float = 0.1  # α
    entropy_weight: float = 5.0  # β
    entropy_log10: bool = True  # released code's log base; False uses natural log
    temperature: float = 1.0  # KD temperature for the student
    steps_per_epoch: int | None = None  # None: pool_size // batch_size


def dafl_generator_losses(teacher_logits: torch.Tensor, teacher_features: torch.Tensor,
                          entropy_log10: bool = True) -> dict[str, torch.Tensor]:
    """DAFL's three generator losses from teacher logits (N×K) and pooled features (N×D)."""
    logits = teacher_logits.float()
    one_hot = F.cross_entropy(logits, logits.argmax(dim=1))
    activation = -teacher_features.float().abs().mean()
    mean_probs = F.softmax(logits, dim=1).mean(dim=0)
    log = torch.log10 if entropy_log10 else torch.log
    entropy = (mean_probs * log(mean_probs)).sum()  # = −H(p̄)
    return {"one_hot": one_hot, "activation": activation, "entropy": entropy}


@register_method
class DAFL(Method):
    name = "dafl"
    Options = DAFLOptions

    def __init__(self, student: Net, ctx: DistillContext, options: DAFLOptions):
        super().__init__(student, ctx, options)
        self.teacher  # noqa: B018  (fails early, with a clear message, when the run has no teacher)
        _, channels, height, width = ctx.images.shape
        self.generator = DAFLGenerator((channels, height, width), latent_dim=options.latent_dim,
                                       width=options.generator_width, output=options.generator_output,
                                       normalize=ctx.normalize).to(ctx.device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=options.generator_lr)
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        generator = {id(p) for p in self.generator.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in generator]

    def steps_per_epoch(self) -> int:
        if self.options.steps_per_epoch is not None:
            return max(1, self.options.steps_per_epoch)
        return max(1, self.ctx.pool_size // self.ctx.batch_size)

    def begin_epoch(self, epoch: int) -> EpochPlan:
        self._sums, self._steps = {}, 0
        return EpochPlan(steps=self.steps_per_epoch())

    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features) of the teacher in one pass, differentiable w.r.t. x."""
        teacher = self.teacher
        pooled = teacher.pool(teacher.features(x))
        return teacher.classifier(pooled), pooled

    def generator_losses(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(images, teacher logits, losses incl. 'total') for latent codes z."""
        images = self.generator(z)
        logits, pooled = self.teacher_outputs(images)
        losses = dafl_generator_losses(logits, pooled, self.options.entropy_log10)
        o = self.options
        losses["total"] = (o.one_hot_weight * losses["one_hot"] + o.activation_weight * losses["activation"]
                           + o.entropy_weight * losses["entropy"])
        return images, logits, losses

    def generator_step(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One Adam step of the generator on L_G; gradients reach only the generator's parameters."""
        params = [p for p in self.generator.parameters() if p.requires_grad]
        self.generator_optimizer.zero_grad(set_to_none=True)
        images, logits, losses = self.generator_losses(z)
        losses["total"].backward(inputs=params)
        self.generator_optimizer.step()
        return images, logits, losses

    def training_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        z = torch.randn(self.ctx.batch_size, self.options.latent_dim, device=self.ctx.device)
        with torch.enable_grad():
            images, logits, losses = self.generator_step(z)
        student_logits = self.student(images.detach())
        loss = kd_loss(student_logits, logits.detach(), self.options.temperature)
        with torch.no_grad():
            share = torch.bincount(logits.argmax(dim=1), minlength=self.ctx.num_classes).max() / len(z)
        for name, value in {**losses, "max_class_share": share}.items():  # summed on the device: no sync per step
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float()
        self._steps += 1
        return {"kd": loss}

    def epoch_metrics(self) -> dict[str, Any]:
        steps = max(self._steps, 1)
        return {f"dafl_gen_{name}": float(value) / steps for name, value in self._sums.items()}

    def method_state(self) -> dict[str, Any]:
        return {"generator_optimizer": self.generator_optimizer.state_dict()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if "generator_optimizer" in state:
            self.generator_optimizer.load_state_dict(state["generator_optimizer"])
