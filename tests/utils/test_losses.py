"""Losses against values worked out by hand from explicit softmax probabilities."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.losses import LOSSES, SegmentationLoss, build_loss

IGNORE = 255


def two_pixel_logits() -> torch.Tensor:
    """(1, 2, 1, 2) logits with known softmax probabilities.

    Pixel 0: logits (0, ln 3) -> p = (1/4, 3/4).  Pixel 1: logits (ln 4, 0) -> p = (4/5, 1/5).
    """
    logits = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    logits[0, 1, 0, 0] = math.log(3.0)
    logits[0, 0, 0, 1] = math.log(4.0)
    return logits


def target_of(*labels: int) -> torch.Tensor:
    return torch.tensor([[list(labels)]], dtype=torch.long)  # (1, 1, 2)


def test_probabilities_are_what_the_cases_assume():
    probs = F.softmax(two_pixel_logits(), dim=1)[0, :, 0, :]
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.8], [0.75, 0.2]], dtype=torch.float64))


def test_cross_entropy_by_hand():
    # Targets (1, 0): p_t = 3/4 and 4/5.
    expected = (-math.log(3 / 4) - math.log(4 / 5)) / 2
    loss = build_loss("ce")(two_pixel_logits(), target_of(1, 0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ignored_pixels_are_excluded_from_sum_and_count():
    # Only pixel 0 (p_t = 3/4) is scored; the mean is over one pixel, not two.
    loss = build_loss("ce", ignore_index=IGNORE)(two_pixel_logits(), target_of(1, IGNORE))
    assert loss.item() == pytest.approx(-math.log(3 / 4), rel=1e-6)


def test_class_weights_give_weighted_mean():
    # w = (2, 0.5); pixel 0 is class 1 (w 0.5, p_t 3/4), pixel 1 is class 0 (w 2, p_t 4/5).
    weight = torch.tensor([2.0, 0.5])
    expected = (0.5 * -math.log(3 / 4) + 2.0 * -math.log(4 / 5)) / (0.5 + 2.0)
    loss = build_loss("ce", weight=weight)(two_pixel_logits(), target_of(1, 0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_ignored_pixel_does_not_enter_denominator():
    weight = torch.tensor([2.0, 0.5])
    loss = build_loss("ce", weight=weight)(two_pixel_logits(), target_of(IGNORE, 0))
    assert loss.item() == pytest.approx(-math.log(4 / 5), rel=1e-6)


def test_focal_by_hand():
    # gamma 2: -(1 - p_t)^2 log p_t per pixel, then the mean over the 2 pixels.
    pixel0 = -((1 - 3 / 4) ** 2) * math.log(3 / 4)
    pixel1 = -((1 - 4 / 5) ** 2) * math.log(4 / 5)
    loss = build_loss("focal", gamma=2.0)(two_pixel_logits(), target_of(1, 0))
    assert loss.item() == pytest.approx((pixel0 + pixel1) / 2, rel=1e-6)


def test_weighted_focal_by_hand():
    weight = torch.tensor([2.0, 0.5])
    pixel0 = 0.5 * -((1 - 3 / 4) ** 2) * math.log(3 / 4)
    pixel1 = 2.0 * -((1 - 4 / 5) ** 2) * math.log(4 / 5)
    loss = build_loss("focal", weight=weight, gamma=2.0)(two_pixel_logits(), target_of(1, 0))
    assert loss.item() == pytest.approx((pixel0 + pixel1) / 2.5, rel=1e-6)


def test_focal_with_gamma_zero_equals_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0, :3] = IGNORE
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    ce = build_loss("ce", weight=weight)(logits, target)
    focal = build_loss("focal", weight=weight, gamma=0.0)(logits, target)
    torch.testing.assert_close(focal, ce)
    # And both agree with PyTorch's own weighted, ignore-aware mean.
    reference = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    torch.testing.assert_close(ce, reference)


def test_mean_does_not_depend_on_batch_size():
    # The weaker ports divide the mean by N again; repeating the batch would then halve the loss.
    logits, target = two_pixel_logits(), target_of(1, 0)
    single = build_loss("ce")(logits, target)
    doubled = build_loss("ce")(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1))
    torch.testing.assert_close(doubled, single)


@pytest.mark.parametrize("name", LOSSES)
def test_all_ignored_gives_zero_with_working_backward(name):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE, dtype=torch.long)
    loss = build_loss(name, weight=torch.tensor([1.0, 2.0, 3.0]))(logits, target)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_focal_gradient_is_finite_for_confident_pixels_and_small_gamma():
    # p_t == 1 exactly: d/dx x**0.5 is infinite at 0, which must not leak NaN into the gradient.
    logits = torch.tensor([[[[100.0, 0.0]], [[-100.0, 0.0]]]], requires_grad=True)
    loss = build_loss("focal", gamma=0.5)(logits, target_of(0, IGNORE))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_gradient_reaches_every_logit_of_scored_pixels():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (1, 4, 4))
    build_loss("focal")(logits, target).backward()
    assert (logits.grad.abs().sum(dim=1) > 0).all()


def test_weight_follows_module_device_and_is_not_in_state_dict():
    loss = build_loss("ce", weight=torch.tensor([1.0, 2.0]))
    assert isinstance(loss, SegmentationLoss)
    assert "weight" in dict(loss.named_buffers())
    assert loss.state_dict() == {}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="ce, focal"):
        build_loss("hinge")
    with pytest.raises(ValueError, match="gamma"):
        build_loss("focal", gamma=-1.0)
    with pytest.raises(ValueError, match="upsample"):
        build_loss("ce")(torch.randn(1, 2, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="3 class weights"):
        build_loss("ce", weight=torch.ones(3))(
            torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
        )
