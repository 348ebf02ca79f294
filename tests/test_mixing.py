"""Batch mixing (kd3.data.mixing) against its formulas, and the teacher labelling the mixed batch."""
import pytest
import torch

from baseline_nets import BNNet, make_context, random_images
from kd3.data.mixing import Mixing, cutmix_boxes
from kd3.methods.base import Batch
from kd3.methods.blind_kd import BlindKD, BlindKDOptions
from kd3.methods.dfnd import DFND, DFNDOptions
from kd3.methods.losses import kd_loss


def test_mixup_blends_each_image_with_its_permuted_partner():
    x = torch.randn(6, 1, 4, 4)
    mixing = Mixing("mixup", alpha=0.5)
    torch.manual_seed(7)
    mixed = mixing(x)
    torch.manual_seed(7)
    partner = torch.randperm(6)
    lam = torch.distributions.Beta(0.5, 0.5).sample((6,)).view(6, 1, 1, 1)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])
    assert not torch.equal(mixed, x)


def test_cutmix_pastes_a_box_of_the_partner_with_the_requested_area():
    # λ = 0.75 on a 16×16 image: a box of side √0.25·16 = 8, i.e. 64 pixels, where it is not clipped.
    masks = cutmix_boxes(torch.full((200,), 0.75), 16, 16)
    areas = masks.flatten(1).sum(dim=1)
    assert areas.max() == 64 and (areas <= 64).all() and (areas > 0).all()
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    # A box: the mask is the outer product of its row and column extents.
    assert torch.equal(masks, rows[:, :, None] & cols[:, None, :])
    x = torch.randn(5, 2, 16, 16)
    torch.manual_seed(1)
    mixed = Mixing("cutmix", alpha=2.0)(x)
    torch.manual_seed(1)
    partner = torch.randperm(5)
    boxes = cutmix_boxes(torch.distributions.Beta(2.0, 2.0).sample((5,)), 16, 16)[:, None]
    assert torch.equal(mixed, torch.where(boxes, x[partner], x))


def test_mixing_none_is_the_identity_and_bad_options_are_refused():
    x = torch.randn(4, 1, 4, 4)
    assert Mixing()(x) is x
    with pytest.raises(ValueError, match="mix='blend'"):
        Mixing("blend")
    with pytest.raises(ValueError, match="mix_alpha"):
        Mixing("mixup", alpha=0.0)


def test_the_teacher_labels_exactly_the_mixed_student_input():
    torch.manual_seed(0)
    images = random_images(32)
    ctx = make_context(BNNet(), images, batch_size=8)
    method = BlindKD(BNNet(width=3), ctx, BlindKDOptions(mix="mixup", teacher_views=0))
    method.eval()
    batch = Batch(indices=torch.arange(8), images=images[:8])
    torch.manual_seed(5)
    losses = method.training_step(batch)
    torch.manual_seed(5)
    x = Mixing("mixup")(ctx.normalize(ctx.augment(batch.images)))
    assert torch.allclose(losses["kd"], kd_loss(method.student(x), ctx.teacher(x), 4.0), atol=1e-6)


@pytest.mark.parametrize("method, options", [(BlindKD, BlindKDOptions), (DFND, DFNDOptions)])
def test_mixing_with_cached_teacher_views_is_refused_with_the_fix(method, options):
    ctx = make_context(BNNet(), random_images(16), batch_size=8)
    with pytest.raises(ValueError, match="set teacher_views: 0"):
        method(BNNet(width=3), ctx, options(mix="cutmix", teacher_views=8))
