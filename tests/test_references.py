import pytest
import torch
import torch.nn.functional as F

from baseline_nets import BNNet, make_context, train_epochs
from kd3.methods.base import Batch, get_method
from kd3.methods.blind_kd import BlindKD, BlindKDOptions
from kd3.methods.references import KDOriginal, Supervised, SupervisedOptions


def labelled(n: int = 48, seed: int = 0):
    """Images whose label is the brightest third (left, middle, right): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randint(0, 40, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 1:7, label * 3:label * 3 + 2] = 230
    return images, labels


def test_registry_and_original_data_flags():
    assert get_method("supervised") is Supervised and get_method("kd-original") is KDOriginal
    assert Supervised.uses_original_data and KDOriginal.uses_original_data
    assert not BlindKD.uses_original_data
    assert KDOriginal.Options is BlindKDOptions


def test_supervised_is_cross_entropy_on_augmented_labelled_images():
    images, labels = labelled()
    ctx = make_context(None, images, labels=labels, flip=True)
    method = Supervised(BNNet(), ctx, SupervisedOptions(label_smoothing=0.1))
    method.eval()
    idx = torch.tensor([5, 1, 30, 7])
    torch.manual_seed(0)
    losses = method.training_step(Batch(indices=idx, images=images[idx]))
    torch.manual_seed(0)
    x = ctx.normalize(ctx.augment(images[idx]))
    expected = F.cross_entropy(method.student(x), labels[idx], label_smoothing=0.1)
    assert set(losses) == {"ce"} and torch.allclose(losses["ce"], expected, atol=1e-6)
    # the augmentation is really applied: with another draw the loss input differs
    assert not torch.equal(ctx.normalize(images[idx]), x)


def test_supervised_learns_and_needs_labels():
    images, labels = labelled(96)
    torch.manual_seed(0)
    ctx = make_context(None, images, labels=labels, flip=False)
    method = Supervised(BNNet(), ctx, SupervisedOptions())
    train_epochs(method, epochs=6, lr=0.1)
    method.eval()
    with torch.no_grad():
        accuracy = (method.student(ctx.normalize(images)).argmax(1) == labels).float().mean()
    assert accuracy > 0.8
    with pytest.raises(ValueError, match="labelled data"):
        Supervised(BNNet(), make_context(None, images), SupervisedOptions())


def test_kd_original_is_kd_on_the_context_images():
    images, labels = labelled()
    torch.manual_seed(0)
    teacher = BNNet()
    ctx = make_context(teacher, images, labels=labels)
    method = KDOriginal(BNNet(width=3), ctx, BlindKDOptions(temperature=2.0, teacher_views=0))
    method.eval()
    idx = torch.tensor([3, 4, 9])
    torch.manual_seed(1)
    losses = method.training_step(Batch(indices=idx, images=images[idx]))
    torch.manual_seed(1)
    x = ctx.normalize(ctx.augment(images[idx]))
    with torch.no_grad():
        z_t = teacher(x)
    z_s = method.student(x)
    expected = F.kl_div(F.log_softmax(z_s / 2, 1), F.log_softmax(z_t / 2, 1), reduction="batchmean",
                        log_target=True) * 4
    assert torch.allclose(losses["kd"], expected, atol=1e-6)
