"""Properties every baseline must have: a frozen teacher stays bit-identical, the methods run in the
real trainer, and a run interrupted and resumed ends exactly where an uninterrupted one does."""
import json

import pytest
import torch

from baseline_nets import BNNet, assert_same_tensors, make_context, random_images, snapshot, train_epochs
from kd3.methods.base import Batch, get_method
from kd3.methods.blind_kd import BlindKDOptions
from kd3.methods.dafl import DAFLOptions
from kd3.methods.deepinversion import DeepInversionOptions
from kd3.methods.dfnd import DFNDOptions
from kd3.methods.references import SupervisedOptions

OPTIONS = {
    "dfnd": lambda: DFNDOptions(keep_fraction=0.5, teacher_views=2),
    "dafl": lambda: DAFLOptions(latent_dim=8, generator_width=16, generator_lr=0.01, steps_per_epoch=3),
    "deepinversion": lambda: DeepInversionOptions(iterations=3, bank_batches=2, refresh_batches=1, steps_per_epoch=3),
    "kd-original": lambda: BlindKDOptions(teacher_views=2),
    "supervised": lambda: SupervisedOptions(),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    teacher = BNNet()
    with torch.no_grad():  # non-trivial running statistics, as a trained teacher has
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    images = random_images(48, seed=seed)
    labels = torch.randint(0, 3, (48,))
    ctx = make_context(teacher, images, labels=labels, batch_size=16)
    return get_method(name)(BNNet(width=3), ctx, OPTIONS[name]())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_methods_leave_the_teacher_bit_identical(name):
    method = build(name)
    teacher = method.ctx.teacher
    for p in teacher.parameters():  # even a teacher whose parameters still require grad
        p.requires_grad_(True)
    before = snapshot(teacher)
    train_epochs(method, epochs=2)
    assert_same_tensors(snapshot(teacher), before)
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert not any(p is q for p in method.trainable_parameters() for q in teacher.parameters())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_methods_run_under_bf16_autocast(name):
    method = build(name)
    plan = method.begin_epoch(0)
    method.train()
    batch = None
    if plan.indices is not None:
        chosen = plan.indices[:16]
        batch = Batch(indices=chosen, images=method.ctx.images[chosen])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = method.training_step(batch)
    loss = sum(losses.values())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def run(name: str, run_dir, epochs: int = 2, stop_after: int | None = None, resume: bool = False):
    trainer = pytest.importorskip("kd3.engine.trainer")  # written in parallel; only these tests need it
    from kd3.config import TrainConfig

    run_dir.mkdir(exist_ok=True)
    method = build(name)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05)
    t = trainer.Trainer(method, cfg, run_dir, show_progress=False)
    if resume:
        t.resume()
    t.fit(stop_after=stop_after)
    return method


@pytest.mark.parametrize("name", ["dfnd", "dafl", "deepinversion"])
def test_resumed_run_matches_uninterrupted_run(name, tmp_path):
    straight = run(name, tmp_path / "a")
    run(name, tmp_path / "b", stop_after=1)
    resumed = run(name, tmp_path / "b", resume=True)
    assert_same_tensors(snapshot(resumed), snapshot(straight))
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
