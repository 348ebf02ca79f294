import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import TinyNet, blobs, context
from kd3.config import TrainConfig
from kd3.data.augment import CropFlip, FixedViews, Normalizer
from kd3.engine import checkpoint
from kd3.engine.evaluate import evaluate
from kd3.engine.selection_metrics import selection_metrics
from kd3.engine.trainer import Trainer, lr_factor, warmup_factor
from kd3.methods.blind_kd import BlindKD, BlindKDOptions
from kd3.methods.losses import kd_loss


def test_cropflip_matches_per_image_pad_slice_flip():
    images = torch.randint(0, 255, (5, 2, 6, 7), dtype=torch.uint8)
    aug = CropFlip(padding=2, flip=True)
    params = torch.tensor([[0, 0, 0], [4, 4, 1], [2, 2, 0], [1, 3, 1], [4, 0, 0]])
    out = aug.apply(images, params)
    padded = F.pad(images, (2, 2, 2, 2))
    for i, (dy, dx, flip) in enumerate(params.tolist()):
        expected = padded[i, :, dy:dy + 6, dx:dx + 7]
        if flip:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)
    assert torch.equal(aug.apply(images, torch.tensor([[2, 2, 0]] * 5)), images)  # centre crop = identity


def test_fixed_views_are_reproducible_and_indexed():
    aug = CropFlip(padding=2, flip=True)
    a, b = FixedViews(10, 3, aug, seed=1), FixedViews(10, 3, aug, seed=1)
    assert torch.equal(a.params, b.params) and a.params.shape == (10, 3, 3)
    images = torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8)
    idx, views = torch.tensor([4, 7]), torch.tensor([2, 0])
    out = a.apply(images, idx, views)
    assert torch.equal(out[1], aug.apply(images[1:2], a.params[7, 0][None])[0])


def test_normalizer_round_trip():
    norm = Normalizer((0.5,), (0.25,))
    images = torch.arange(0, 256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = norm(images)
    assert torch.allclose(x[0, 0, 0, 0], torch.tensor((0 / 255 - 0.5) / 0.25))
    assert torch.equal(norm.denormalize(x), images)


def test_kd_loss_matches_formula():
    s, t, temp = torch.randn(4, 5), torch.randn(4, 5), 3.0
    p_t = F.softmax(t / temp, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / temp, 1))).sum(1).mean() * temp**2
    assert torch.allclose(kd_loss(s, t, temp), manual, atol=1e-6)
    assert kd_loss(t, t, temp).abs() < 1e-6


def test_lr_schedules_by_hand():
    step = TrainConfig(epochs=8, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(e, step) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = TrainConfig(epochs=4, schedule="cosine")
    assert [lr_factor(e, cosine) for e in range(4)] == pytest.approx([1, 0.8535534, 0.5, 0.1464466])


def test_warmup_ramps_linearly_by_hand():
    cfg = TrainConfig(epochs=4, warmup_epochs=1.5)
    # 4 steps per epoch: the ramp's 6 steps reach lr at step 6, then the schedule alone.
    ramp = [warmup_factor(e, s, 4, cfg) for e in range(3) for s in range(4)]
    assert ramp == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1, 1, 1, 1, 1])
    assert warmup_factor(0, 0, 4, TrainConfig(warmup_epochs=0)) == 1.0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the spy below
def test_trainer_steps_with_warmed_up_learning_rates(tmp_path, monkeypatch):
    """The optimizer sees base lr × schedule × ramp at every step, and the schedule alone after the ramp."""
    images, labels = blobs(64)
    teacher = _trained_teacher(images, labels, steps=5)
    trainer = _blind_trainer(teacher, images, tmp_path, epochs=3)
    trainer.cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, schedule="step", milestones=[0.5], warmup_epochs=1.5)
    used = []
    step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda: (used.append(trainer.optimizer.param_groups[0]["lr"]), step()))
    trainer.fit()
    ramp = [0.05 * k / 6 for k in range(1, 7)]  # 4 steps per epoch (64 images, batches of 16)
    assert used == pytest.approx(ramp + [0.05] * 2 + [0.005] * 4)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([used[0], used[4], used[8]])  # each epoch's first step


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"a": torch.ones(2)}, path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_selection_metrics_hand_example():
    relevant = np.array([True, True, False, False, True])
    source = np.array(["r", "r", "noise", "noise", "r"])
    correct = np.array([True, False, False, False, True])
    m = selection_metrics(torch.tensor([0, 1, 2]), relevant, source, correct)
    assert m["selected"] == 3
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["precision_correct"] == pytest.approx(1 / 3) and m["recall_correct"] == pytest.approx(1 / 2)
    assert m["source_share"] == pytest.approx({"r": 2 / 3, "noise": 1 / 3})


def _trained_teacher(images, labels, steps=60):
    torch.manual_seed(0)
    teacher = TinyNet()
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    norm = Normalizer((0.2,), (0.3,))
    for _ in range(steps):
        loss = F.cross_entropy(teacher(norm(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval().requires_grad_(False)


def _blind_trainer(teacher, images, run_dir, epochs=2):
    torch.manual_seed(1)
    ctx = context(teacher, images, epochs=epochs)
    method = BlindKD(TinyNet(), ctx, BlindKDOptions(temperature=4.0, teacher_views=2))
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, schedule="step", milestones=[0.5])
    return Trainer(method, cfg, run_dir, show_progress=False)


def test_resume_gives_identical_weights(tmp_path):
    images, labels = blobs(64)
    teacher = _trained_teacher(images, labels, steps=5)
    straight = _blind_trainer(teacher, images, tmp_path / "a")
    (tmp_path / "a").mkdir()
    straight.fit()

    (tmp_path / "b").mkdir()
    first = _blind_trainer(teacher, images, tmp_path / "b")
    first.fit(stop_after=1)
    torch.manual_seed(123)  # whatever ran in between must not matter
    torch.rand(17)
    resumed = _blind_trainer(teacher, images, tmp_path / "b")
    resumed.resume()
    assert resumed.start_epoch == 1
    resumed.fit()
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_blind_kd_beats_untrained_student(tmp_path):
    images, labels = blobs(300, seed=0)
    test_images, test_labels = blobs(200, seed=5)
    teacher = _trained_teacher(images, labels)
    norm = Normalizer((0.2,), (0.3,))
    assert evaluate(teacher, test_images, test_labels, norm, torch.device("cpu")).accuracy > 0.9
    trainer = _blind_trainer(teacher, images, tmp_path, epochs=4)
    untrained = evaluate(trainer.method.student, test_images, test_labels, norm, torch.device("cpu")).accuracy
    trainer.fit()
    trained = evaluate(trainer.method.student, test_images, test_labels, norm, torch.device("cpu")).accuracy
    assert trained > 0.85 and trained > untrained + 0.3


def test_training_never_changes_the_teacher(tmp_path):
    images, labels = blobs(64)
    teacher = _trained_teacher(images, labels, steps=3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _blind_trainer(teacher, images, tmp_path).fit()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_subset_selections_are_saved_per_epoch(tmp_path):
    from kd3.methods.base import EpochPlan

    images, labels = blobs(40)
    trainer = _blind_trainer(_trained_teacher(images, labels, steps=2), images, tmp_path, epochs=2)
    trainer.method.begin_epoch = lambda epoch: EpochPlan(indices=torch.tensor([5, 1, 30, 7] * (epoch + 1))[: 3 + epoch])
    trainer.fit()
    assert np.load(tmp_path / "selections" / "epoch-0001.npy").tolist() == [1, 5, 30]
    assert np.load(tmp_path / "selections" / "epoch-0002.npy").tolist() == [1, 5, 7, 30]


def test_epoch_steps_cycle_reshuffled_passes_over_a_subset(tmp_path):
    from kd3.methods.base import EpochPlan

    images, labels = blobs(40)
    trainer = _blind_trainer(_trained_teacher(images, labels, steps=2), images, tmp_path, epochs=1)
    trainer.cfg.epoch_steps = 5
    subset = torch.arange(10, 22)  # 12 images, batch 16: one pass would be a single step
    trainer.method.begin_epoch = lambda epoch: EpochPlan(indices=subset)
    seen = []
    step = trainer.method.training_step
    trainer.method.training_step = lambda batch: seen.append(batch.indices.clone()) or step(batch)
    trainer.fit()
    assert len(seen) == 5 and all(len(b) == 12 for b in seen)
    assert all(sorted(b.tolist()) == subset.tolist() for b in seen)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["train_images"] == 60
