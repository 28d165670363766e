"""Dice, Lovász-softmax, OHEM and weighted sums against hand-worked cases and small numpy
references written from the papers' definitions (not from our code): random logits with ignored
pixels, with and without class weights, to 1e-5."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import train
from utils.losses import (LOSSES, DiceLoss, LovaszSoftmaxLoss, OhemCrossEntropyLoss,
                          OutputsLoss, WeightedSumLoss, build_loss, loss_spec, parse_loss_spec)

IGNORE = 255


# --------------------------------------------------------------------------- numpy references


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def scored_pixels(logits: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(P, C)`` probabilities and ``(P,)`` labels of the pixels that are not ignored."""
    probs = np.moveaxis(softmax(logits.astype(np.float64)), 1, -1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    keep = labels != IGNORE
    return probs[keep], labels[keep]


def dice_reference(logits, target, weight=None, smooth=0.0, eps=1e-7) -> float:
    """smp's multiclass Dice: per class, TP / (TP + FP/2 + FN/2) with ``smooth`` added above and
    below (the denominator at least ``eps``); 0 for a class absent from the targets; the (weighted)
    mean over every class."""
    probs, labels = scored_pixels(logits, target)
    losses = []
    for c in range(probs.shape[1]):
        truth = (labels == c).astype(np.float64)
        tp = np.minimum(probs[:, c], truth).sum()
        fp = np.clip(probs[:, c] - truth, 0, None).sum()
        fn = np.clip(truth - probs[:, c], 0, None).sum()
        score = (tp + smooth) / max(tp + fp / 2 + fn / 2 + smooth, eps)
        losses.append(1.0 - score if truth.sum() > 0 else 0.0)
    weight = np.ones(len(losses)) if weight is None else np.asarray(weight, dtype=np.float64)
    return float((np.array(losses) * weight).sum() / weight.sum())


def lovasz_reference(logits, target, weight=None) -> float:
    """Berman et al.: with errors sorted in decreasing order, the Lovász extension of the Jaccard
    loss is ``sum_k e_k (D(k) - D(k-1))``, ``D(k) = |M_k| / |F u M_k|`` the Jaccard loss when the
    first ``k`` pixels are the mispredicted set ``M_k`` and ``F`` the class's pixels."""
    probs, labels = scored_pixels(logits, target)
    present = sorted(set(labels.tolist()))
    losses = []
    for c in present:
        foreground = labels == c
        errors = np.abs(foreground - probs[:, c])
        order = np.argsort(-errors, kind="stable")
        previous, total = 0.0, 0.0
        for k in range(1, len(order) + 1):
            mispredicted = order[:k]
            union = foreground.sum() + (~foreground[mispredicted]).sum()
            jaccard_loss = k / union
            total += errors[order[k - 1]] * (jaccard_loss - previous)
            previous = jaccard_loss
        losses.append(total)
    weight = np.ones(len(present)) if weight is None else np.asarray(weight, float)[present]
    return float((np.array(losses) * weight).sum() / weight.sum())


def ohem_reference(logits, target, weight=None, top_k=0.2) -> float:
    """detectron2's DeepLabCE over the scored pixels: the mean of the ``int(top_k * n)`` (at
    least 1) largest ``w[t] * -log p_t``."""
    probs, labels = scored_pixels(logits, target)
    losses = -np.log(probs[np.arange(len(labels)), labels])
    if weight is not None:
        losses = losses * np.asarray(weight, dtype=np.float64)[labels]
    kept = max(1, int(top_k * len(losses)))
    return float(np.sort(losses)[::-1][:kept].mean())


def random_case(seed: int, classes: int = 4, shape=(2, 6, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets with about a fifth of the pixels ignored and every class present."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(shape[0], classes, *shape[1:], generator=generator)
    target = torch.randint(0, classes, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < 0.2] = IGNORE
    target.view(-1)[:classes] = torch.arange(classes)
    return logits, target


WEIGHTS = [None, [0.5, 2.0, 1.0, 3.0]]


def two_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel 0: p = (1/4, 3/4), class 1. Pixel 1: p = (4/5, 1/5), class 0."""
    logits = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    logits[0, 1, 0, 0] = math.log(3.0)
    logits[0, 0, 0, 1] = math.log(4.0)
    return logits, torch.tensor([[[1, 0]]])


# --------------------------------------------------------------------------- by hand


def test_dice_by_hand():
    # class 0: p = (1/4, 4/5), y = (0, 1): 2 TP / (sum p + sum y) = 1.6 / 2.05
    # class 1: p = (3/4, 1/5), y = (1, 0): 1.5 / 1.95
    expected = ((1 - 1.6 / 2.05) + (1 - 1.5 / 1.95)) / 2
    assert DiceLoss()(*two_pixels()).item() == pytest.approx(expected, abs=1e-7)


def test_dice_absent_class_counts_as_zero_in_the_mean():
    # Pixel 1 ignored: class 0 is absent (loss 0), class 1 scores 2 * 3/4 / (3/4 + 1).
    logits, target = two_pixels()
    target[0, 0, 1] = IGNORE
    expected = (0 + (1 - 1.5 / 1.75)) / 2
    assert DiceLoss()(logits, target).item() == pytest.approx(expected, abs=1e-7)


def test_lovasz_by_hand():
    # class 0: errors (1/4 bg, 1/5 fg); D(1) = 1/(1+1), D(2) = 2/(1+1): 1/4 * 1/2 + 1/5 * 1/2.
    # class 1: errors (1/4 fg, 1/5 bg); D(1) = 1/1, D(2) = 2/2: 1/4 * 1 + 1/5 * 0.
    expected = (0.225 + 0.25) / 2
    assert LovaszSoftmaxLoss()(*two_pixels()).item() == pytest.approx(expected, abs=1e-7)


def test_ohem_keeps_the_hardest_pixels_by_hand():
    # CE: pixel 0 -log(3/4), pixel 1 -log(4/5); half of 2 pixels keeps pixel 0 only.
    loss = OhemCrossEntropyLoss(top_k=0.5)(*two_pixels())
    assert loss.item() == pytest.approx(-math.log(3 / 4), abs=1e-7)
    # All pixels kept: the plain mean.
    loss = OhemCrossEntropyLoss(top_k=1.0)(*two_pixels())
    assert loss.item() == pytest.approx((-math.log(3 / 4) - math.log(4 / 5)) / 2, abs=1e-7)
    # 0.2 of 2 pixels rounds to none: one is kept.
    assert OhemCrossEntropyLoss(top_k=0.2)(*two_pixels()).item() == pytest.approx(
        -math.log(3 / 4), abs=1e-7)


# --------------------------------------------------------------------------- random references


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("weight", WEIGHTS)
def test_dice_equals_reference(seed, weight):
    logits, target = random_case(seed)
    loss = DiceLoss(weight=None if weight is None else torch.tensor(weight))(logits, target)
    assert loss.item() == pytest.approx(dice_reference(logits.numpy(), target.numpy(), weight),
                                        abs=1e-5)


def test_dice_smooth_equals_reference():
    logits, target = random_case(7)
    loss = DiceLoss(smooth=1.0)(logits, target)
    assert loss.item() == pytest.approx(
        dice_reference(logits.numpy(), target.numpy(), smooth=1.0), abs=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("weight", WEIGHTS)
def test_lovasz_equals_reference(seed, weight):
    logits, target = random_case(seed)
    target[target == 2] = IGNORE  # a class absent from the batch is not averaged
    loss = LovaszSoftmaxLoss(weight=None if weight is None else torch.tensor(weight))(
        logits, target)
    assert loss.item() == pytest.approx(
        lovasz_reference(logits.numpy(), target.numpy(), weight), abs=1e-5)


@pytest.mark.parametrize("top_k", [0.2, 0.37, 1.0])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_ohem_equals_reference(top_k, weight):
    logits, target = random_case(3)
    loss = OhemCrossEntropyLoss(weight=None if weight is None else torch.tensor(weight),
                                top_k=top_k)(logits, target)
    assert loss.item() == pytest.approx(
        ohem_reference(logits.numpy(), target.numpy(), weight, top_k), abs=1e-5)


def test_weighted_sum_is_the_sum_of_its_terms():
    logits, target = random_case(4)
    expected = 0.5 * ohem_reference(logits.numpy(), target.numpy(), top_k=1.0) + \
        2.0 * dice_reference(logits.numpy(), target.numpy())
    loss = build_loss("0.5*ohem+2*dice", top_k=1.0)
    assert isinstance(loss, WeightedSumLoss)
    assert loss(logits, target).item() == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- every loss


SPECS = list(LOSSES) + ["ce+dice", "0.5*focal+1.0*lovasz", "ohem+dice"]


@pytest.mark.parametrize("spec", SPECS)
def test_only_ignored_pixels_give_zero_loss_and_zero_gradient(spec):
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.full((2, 5, 5), IGNORE)
    loss = build_loss(spec, weight=torch.tensor([1.0, 2.0, 3.0, 4.0]))(logits, target)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("spec", SPECS)
def test_ignored_pixels_get_no_gradient_and_scored_ones_do(spec):
    logits, target = random_case(5)
    logits.requires_grad_(True)
    build_loss(spec, top_k=1.0)(logits, target).backward()
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[ignored], torch.zeros_like(logits.grad[ignored]))
    assert logits.grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("spec", SPECS)
def test_each_loss_scores_the_output_dict_with_its_aux_head(spec):
    logits, target = random_case(6)
    aux = torch.randn_like(logits)
    criterion = build_loss(spec)
    loss = OutputsLoss(criterion, aux_weight=0.4)({"out": logits, "aux": aux}, target)
    expected = criterion(logits, target) + 0.4 * criterion(aux, target)
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------- the spec


def test_spec_syntax():
    assert parse_loss_spec("dice") == [(1.0, "dice")]
    assert parse_loss_spec(" 0.5 * ce + 1.0*dice ") == [(0.5, "ce"), (1.0, "dice")]
    assert loss_spec("0.5*ce+1.0*dice") == "0.5*ce+dice"
    assert loss_spec("ce+lovasz") == "ce+lovasz"


@pytest.mark.parametrize("spec, problem", [
    ("ce+", "empty term"), ("dise", "unknown loss 'dise'"), ("x*ce", "not a number"),
    ("-1*ce", "positive"), ("0*dice", "positive"), ("ce+ce", "twice"), ("", "empty term"),
])
def test_a_malformed_spec_is_one_line_naming_the_flag(spec, problem, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args([f"--loss-type={spec}"])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error_lines) == 1
    assert "--loss-type" in error_lines[0] and problem in error_lines[0]


def test_flags_reach_the_loss():
    args = train.get_args_parser().parse_args(["--loss-type", "0.5*ce+dice", "--ohem-top-k",
                                               "0.3"])
    assert args.loss_type == "0.5*ce+dice" and args.ohem_top_k == 0.3
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--ohem-top-k", "0"])
