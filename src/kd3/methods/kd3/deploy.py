"""The shipped KD³ student: student backbone → projector φ → the teacher's pool and classifier
(``sharing: map``), or student backbone → student pool → φ → the teacher's classifier (``sharing: pooled``).

``SharedClassifierStudent`` is a snapshot (deep copies, frozen, in eval mode), so what is evaluated
or exported does not move with further training. Its forward is the op sequence training uses for
z_S, so its outputs equal the training-time logits in eval mode. It holds only the parts it runs:
top-level children of the student that ``features`` never calls, and of the teacher that ``pool``
and ``classifier`` never call, are replaced by ``nn.Identity`` (checked against the full network
on a probe; if anything differs the full copy is kept), so parameter counts and exported files
describe the deployed model rather than include the teacher's backbone.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch
from torch import nn

from kd3.methods.kd3.projector import Projector
from kd3.models.base import Net


def shared_classifier_logits(teacher: Net, projected: torch.Tensor) -> torch.Tensor:
    """z_S = h_T(pool_T(φ(F_S))): the teacher's own pool (GAP for most nets) and linear layer."""
    return teacher.classifier(teacher.pool(projected))


def probe_input(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Random probe data from a private generator: building a deployable mid-training (the trainer
    evaluates every epoch) must not move the global RNG."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device)


def used_copy(net: Net, run: Callable[[Net], torch.Tensor]) -> Net:
    """A frozen eval-mode deep copy of ``net`` whose top-level children that ``run`` does not call are
    replaced by ``nn.Identity`` (``classifier`` is always kept, it is tiny and part of the Net API)."""
    full = copy.deepcopy(net).eval().requires_grad_(False)
    called: set[str] = set()
    handles = [module.register_forward_pre_hook(partial(lambda top, *_: called.add(top), name.split(".")[0]))
               for name, module in full.named_modules() if name]
    with torch.no_grad():
        expected = run(full)
    for handle in handles:
        handle.remove()
    stripped = copy.deepcopy(full)
    for name, _ in full.named_children():
        if name not in called and name != "classifier":
            setattr(stripped, name, nn.Identity())
    try:
        with torch.no_grad():
            same = torch.equal(run(stripped), expected)
    except Exception:  # noqa: BLE001 - e.g. a pool that reads a stripped module's weights directly
        same = False
    return stripped if same else full


class SharedClassifierStudent(nn.Module):
    def __init__(self, student: Net, projector: Projector, teacher: Net, image_shape: tuple[int, ...],
                 feature_shape: tuple[int, ...]):
        """``image_shape`` (C, H, W) of the inputs and ``feature_shape`` (C_T, H, W) of φ's output
        size the probes that find which parts are used."""
        super().__init__()
        device = next(student.parameters()).device
        self.backbone = used_copy(student, lambda net: net.features(probe_input((2, *image_shape), device)))
        self.projector = copy.deepcopy(projector).eval()
        teacher_device = next(teacher.parameters()).device
        self.head = used_copy(teacher, lambda net: shared_classifier_logits(
            net, probe_input((2, *feature_shape), teacher_device)))
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # shared_classifier_logits written out: TorchScript cannot pass a module to a free function.
        return self.head.classifier(self.head.pool(self.projector(self.backbone.features(x))))


class PooledSharedClassifierStudent(nn.Module):
    """The shipped student of ``sharing: pooled``: student backbone → the student's own pool → φ on
    the pooled vector → the teacher's last linear layer (nothing else of the teacher). A frozen
    eval-mode snapshot like ``SharedClassifierStudent``, with the op sequence training uses for z_S."""

    def __init__(self, student: Net, projector: nn.Module, teacher: Net, image_shape: tuple[int, ...]):
        super().__init__()
        device = next(student.parameters()).device
        self.backbone = used_copy(student, lambda net: net.pool(net.features(probe_input((2, *image_shape), device))))
        self.projector = copy.deepcopy(projector).eval()
        self.classifier = copy.deepcopy(teacher.classifier).eval()
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.projector(self.backbone.pool(self.backbone.features(x))))
