"""Per-pixel segmentation losses and their weighted sums, all ignoring one label value.

=========  ==================================================================================
name       what it is
=========  ==================================================================================
ce         cross-entropy: the class-weighted mean over scored pixels
focal      focal loss (Lin et al., https://arxiv.org/abs/1708.02002), the same mean
dice       soft Dice over the classes present in the batch, computed as
           segmentation_models_pytorch's ``DiceLoss(mode="multiclass")``
lovasz     Lovász-softmax (Berman et al., https://arxiv.org/abs/1705.08790), over the batch
           (``per_image=False``) and the present classes (``classes="present"``)
ohem       hard-pixel mining as detectron2's DeepLab ``DeepLabCE``: the mean cross-entropy of
           the top-k fraction of pixels
=========  ==================================================================================

A pixel whose target is ``ignore_index`` is neither learned nor scored by any of them, and a
batch of only ignored pixels gives a loss of 0 that still backpropagates (zero gradients). Each
loss maps ``(N, C, H, W)`` logits and ``(N, H, W)`` targets to a scalar;
:class:`OutputsLoss` applies one to the model's output dict.

``--loss-type`` takes a sum (:func:`parse_loss_spec`): terms ``[WEIGHT*]NAME`` joined by ``+``,
e.g. ``ce+dice`` or ``0.5*ce+1.0*dice``.
"""
from __future__ import annotations

import argparse
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: Loss names accepted by :func:`build_loss`, alone or in a weighted sum.
LOSSES = ("ce", "focal", "dice", "lovasz", "ohem")
#: detectron2's DeepLab hard-pixel mining keeps the worst 20 % of pixels.
DEFAULT_TOP_K = 0.2
_SPEC_HELP = "write NAME or WEIGHT*NAME terms joined by +, e.g. ce+dice or 0.5*ce+1.0*dice"


class PixelLoss(nn.Module):
    """Base of the losses here: the ignore value, optional class weights and input checks.

    Args:
        ignore_index: target value of pixels that are neither learned nor scored.
        weight: ``(C,)`` non-negative class weights, or ``None`` for equal weights; how each
            loss uses them is in its docstring.
    """

    def __init__(self, ignore_index: int = 255, weight: Tensor | None = None) -> None:
        super().__init__()
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.dim() != 1 or bool((weight < 0).any()):
                raise ValueError(
                    f"class weights must be a 1-D tensor of non-negative values, got shape "
                    f"{tuple(weight.shape)}"
                )
        self.ignore_index = ignore_index
        # A buffer so the weights follow .to(device); not persistent because the loss is rebuilt
        # from the settings, never restored from a checkpoint.
        self.register_buffer("weight", weight, persistent=False)

    def check_inputs(self, logits: Tensor, target: Tensor) -> None:
        """Raise ``ValueError`` unless ``logits`` is ``(N, C, H, W)`` and ``target`` ``(N, H, W)``
        of the same N, H, W, with ``C`` class weights if any."""
        if logits.dim() != 4 or target.dim() != 3 or logits.shape[2:] != target.shape[1:] or (
            logits.shape[0] != target.shape[0]
        ):
            raise ValueError(
                f"expected logits (N, C, H, W) and target (N, H, W) of the same N, H, W; got "
                f"{tuple(logits.shape)} and {tuple(target.shape)} (upsample the logits first)"
            )
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ValueError(
                f"{self.weight.numel()} class weights given for logits with {logits.shape[1]} "
                f"classes"
            )

    def extra_repr(self) -> str:
        weighted = "yes" if self.weight is not None else "no"
        return f"ignore_index={self.ignore_index}, class_weights={weighted}"


def _scored_and_safe(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(scored mask, target with ignored pixels set to class 0)``: class 0 only gives gather and
    one_hot a valid index; the mask keeps those pixels out."""
    scored = target != ignore_index
    return scored, torch.where(scored, target, torch.zeros_like(target))


def _nothing_scored(logits: Tensor) -> Tensor:
    """A zero that is part of the graph, so backward() works and gives zero gradients."""
    return logits.float().sum() * 0.0


class SegmentationLoss(PixelLoss):
    """Cross-entropy (``gamma == 0``) or focal loss (``gamma > 0``) over pixels.

    For a scored pixel with true class ``t`` and softmax probability ``p_t``:
    ``loss = -w[t] * (1 - p_t) ** gamma * log(p_t)``; the result is
    ``sum(loss) / sum(w[t])`` over scored pixels (``w[t] = 1`` without class weights), exactly
    :func:`torch.nn.functional.cross_entropy`'s weighted mean. The mean is never divided again by
    the batch size, and the focal term is applied to every pixel, not to the batch-mean loss.

    Args:
        ignore_index: target value of pixels that are neither learned nor scored.
        weight: ``(C,)`` non-negative class weights, or ``None`` for equal weights.
        gamma: focusing exponent, ``>= 0``; ``0`` gives plain cross-entropy.
    """

    def __init__(self, ignore_index: int = 255, weight: Tensor | None = None, gamma: float = 0.0):
        if gamma < 0:
            raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean loss over the scored pixels.

        Args:
            logits: ``(N, C, H, W)`` unnormalised class scores (any float dtype; the loss is
                computed in float32).
            target: ``(N, H, W)`` int64 class ids in ``[0, C)`` or ``ignore_index``.

        Returns:
            A scalar float32 tensor. When every pixel is ignored it is ``0`` and still part of the
            graph, so ``backward()`` works (and gives zero gradients) instead of producing NaN.
        """
        self.check_inputs(logits, target)
        log_probs = F.log_softmax(logits.float(), dim=1)
        scored, safe_target = _scored_and_safe(target, self.ignore_index)
        log_p_true = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        pixel_loss = -log_p_true
        if self.gamma > 0:
            # Clamp away from 0: d/dx x**gamma is infinite at 0 for gamma < 1, and 0 * inf would
            # turn a confident (or ignored, weight 0) pixel's gradient into NaN.
            one_minus_p = (1.0 - log_p_true.exp()).clamp_min(torch.finfo(log_p_true.dtype).tiny)
            pixel_loss = pixel_loss * one_minus_p.pow(self.gamma)
        pixel_weight = scored.to(pixel_loss.dtype)
        if self.weight is not None:
            pixel_weight = pixel_weight * self.weight.to(pixel_loss.device)[safe_target]
        total = (pixel_loss * pixel_weight).sum()
        # Clamp instead of branching on the count: no host sync, and 0 / tiny = 0 (not NaN) when
        # nothing is scored, while a real sum of weights is never that small.
        return total / pixel_weight.sum().clamp_min(torch.finfo(pixel_weight.dtype).tiny)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


class DiceLoss(PixelLoss):
    """Multi-class soft Dice loss, as segmentation_models_pytorch's
    ``DiceLoss(mode="multiclass", ignore_index=...)`` computes it.

    With softmax probabilities ``p`` and one-hot targets ``y`` of the scored pixels, summed over
    the batch and the pixels for each class ``c``: ``I = sum(p * y)``, and the score is
    ``(I + smooth) / max(I + (sum(p) - I) / 2 + (sum(y) - I) / 2 + smooth, eps)``, i.e.
    ``2 I / (sum(p) + sum(y))`` when ``smooth == 0``. The class loss is ``1 - score`` for a class
    present in the batch's targets and 0 for an absent one; the result is the mean over all ``C``
    classes (absent ones count as 0, as in smp), or with class weights
    ``sum(w[c] * loss[c]) / sum(w[c])`` over all classes (smp's ``class_weights``).
    Milletari et al., https://arxiv.org/abs/1606.04797.

    Args:
        ignore_index: target value of pixels that are neither learned nor scored.
        weight: ``(C,)`` non-negative class weights, or ``None`` for equal weights.
        smooth: added to the numerator and denominator of each class's score (smp's default 0).
        eps: lower bound of the denominator (smp's default ``1e-7``).
    """

    def __init__(self, ignore_index: int = 255, weight: Tensor | None = None,
                 smooth: float = 0.0, eps: float = 1e-7) -> None:
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.smooth, self.eps = float(smooth), float(eps)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The Dice loss of ``(N, C, H, W)`` logits against ``(N, H, W)`` targets; a float32
        scalar in ``[0, 1]``, 0 when every pixel is ignored."""
        self.check_inputs(logits, target)
        scored, safe_target = _scored_and_safe(target, self.ignore_index)
        scored = scored.unsqueeze(1).float()
        probs = F.softmax(logits.float(), dim=1) * scored
        # scatter into float: F.one_hot would hold an int64 copy of (N, H, W, C).
        one_hot = torch.zeros_like(probs).scatter_(1, safe_target.unsqueeze(1), 1.0) * scored
        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)
        pred_sum, true_sum = probs.sum(dims), one_hot.sum(dims)
        score = (intersection + self.smooth) / (
            (pred_sum + true_sum) / 2 + self.smooth).clamp_min(self.eps)
        class_loss = (1.0 - score) * (true_sum > 0).float()
        if self.weight is None:
            return class_loss.mean()
        weight = self.weight.to(class_loss.device)
        return (class_loss * weight).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, smooth={self.smooth}, eps={self.eps}"


def lovasz_gradient(foreground_sorted: Tensor) -> Tensor:
    """The gradient of the Lovász extension of the Jaccard loss at errors sorted in decreasing
    order (Berman et al., Algorithm 1): ``J(k) - J(k - 1)`` with ``J(k)`` the Jaccard loss of
    predicting the first ``k`` pixels as foreground.

    Args:
        foreground_sorted: ``(P,)`` float 0/1, whether each pixel is foreground, in error order.
    """
    total = foreground_sorted.sum()
    intersection = total - foreground_sorted.cumsum(0)
    union = total + (1.0 - foreground_sorted).cumsum(0)  # >= 1 from the first pixel on
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class LovaszSoftmaxLoss(PixelLoss):
    """Lovász-softmax loss (Berman et al., https://arxiv.org/abs/1705.08790), as
    segmentation_models_pytorch's ``LovaszLoss(mode="multiclass", per_image=False)`` computes
    it: every scored pixel of the batch is pooled (not image by image), and for each class
    ``c`` present among them the errors ``|[t == c] - p_c|`` sorted in decreasing order are
    dotted with :func:`lovasz_gradient`; the result is the mean over the present classes
    (``classes="present"``). With class weights it is ``sum(w[c] * loss[c]) / sum(w[c])`` over
    the present classes (smp has no class weights; equal weights give its plain mean).
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of ``(N, C, H, W)`` logits against ``(N, H, W)`` targets; a float32 scalar,
        0 when every pixel is ignored."""
        self.check_inputs(logits, target)
        num_classes = logits.shape[1]
        probs = F.softmax(logits.float(), dim=1).movedim(1, -1).reshape(-1, num_classes)
        labels = target.reshape(-1)
        scored = labels != self.ignore_index
        probs, labels = probs[scored], labels[scored]
        if labels.numel() == 0:
            return _nothing_scored(logits)
        present = torch.unique(labels)
        if int(present.max()) >= num_classes:
            raise ValueError(f"target holds class {int(present.max())} but the logits have "
                             f"{num_classes} classes")
        losses = []
        for class_id in present.tolist():
            foreground = (labels == class_id).float()
            errors = (foreground - probs[:, class_id]).abs()
            errors_sorted, order = torch.sort(errors, descending=True)
            losses.append(torch.dot(errors_sorted, lovasz_gradient(foreground[order])))
        class_loss = torch.stack(losses)
        if self.weight is None:
            return class_loss.mean()
        weight = self.weight.to(class_loss.device)[present]
        return (class_loss * weight).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)


class OhemCrossEntropyLoss(PixelLoss):
    """Hard-pixel mining (OHEM) as detectron2's DeepLab ``DeepLabCE``: the mean of the largest
    ``k`` per-pixel cross-entropies, the top-k fraction rule (not a loss threshold).

    Each scored pixel's loss is ``-w[t] * log(p_t)`` (``w[t] = 1`` without class weights, as
    detectron2 passes them to its per-pixel cross-entropy); the result is the plain mean of the
    ``k = max(min_kept, int(top_k * n))`` largest of them (at most ``n``), ``n`` the number of
    scored pixels. detectron2 counts ``k`` over all pixels, ignored ones included (their losses
    are 0 and fill the kept set once fewer than ``k`` pixels are scored); counting only scored
    pixels keeps ignored ones out of the mean entirely.

    Args:
        ignore_index: target value of pixels that are neither learned nor scored.
        weight: ``(C,)`` non-negative class weights, or ``None`` for equal weights.
        top_k: fraction of scored pixels kept, in ``(0, 1]`` (detectron2's DeepLab: 0.2).
        min_kept: the fewest pixels kept when any is scored (``>= 1``: a mean of none is NaN).
    """

    def __init__(self, ignore_index: int = 255, weight: Tensor | None = None,
                 top_k: float = DEFAULT_TOP_K, min_kept: int = 1) -> None:
        if not 0 < top_k <= 1:
            raise ValueError(f"ohem top_k must be a fraction in (0, 1], got {top_k}")
        if min_kept < 1:
            raise ValueError(f"ohem min_kept must be at least 1, got {min_kept}")
        super().__init__(ignore_index=ignore_index, weight=weight)
        self.top_k, self.min_kept = float(top_k), int(min_kept)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The mean of the hardest pixels' losses; a float32 scalar, 0 when every pixel is
        ignored."""
        self.check_inputs(logits, target)
        log_probs = F.log_softmax(logits.float(), dim=1)
        scored, safe_target = _scored_and_safe(target, self.ignore_index)
        pixel_loss = -log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        if self.weight is not None:
            pixel_loss = pixel_loss * self.weight.to(pixel_loss.device)[safe_target]
        pixel_loss = pixel_loss[scored]
        count = pixel_loss.numel()
        if count == 0:
            return _nothing_scored(logits)
        kept = min(count, max(self.min_kept, int(self.top_k * count)))
        return torch.topk(pixel_loss, kept, sorted=False).values.mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, min_kept={self.min_kept}"


class WeightedSumLoss(nn.Module):
    """``sum(weight_i * loss_i(logits, target))`` over named terms, e.g. ``ce + dice``.

    Args:
        terms: ``(weight, loss module)`` pairs; each module maps logits and targets to a scalar.
    """

    def __init__(self, terms: list[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a weighted sum of losses needs at least one term")
        self.weights = [float(weight) for weight, _ in terms]
        self.terms = nn.ModuleList(loss for _, loss in terms)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        total = self.weights[0] * self.terms[0](logits, target)
        for weight, loss in zip(self.weights[1:], self.terms[1:]):
            total = total + weight * loss(logits, target)
        return total

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


def parse_loss_spec(text: str) -> list[tuple[float, str]]:
    """Read a loss spec: terms ``[WEIGHT*]NAME`` joined by ``+`` (spaces allowed).

    ``"ce"`` -> ``[(1.0, "ce")]``; ``"0.5*ce+1.0*dice"`` -> ``[(0.5, "ce"), (1.0, "dice")]``.
    Names are those of :data:`LOSSES`, each at most once; a weight is a positive finite number.

    Raises:
        ValueError: a one-line message that shows the spec, the bad part and the syntax.
    """
    terms: list[tuple[float, str]] = []
    for part in text.split("+"):
        weight_text, star, name = part.strip().rpartition("*")
        name = name.strip()
        if not name:
            raise ValueError(f"{text!r} has an empty term; {_SPEC_HELP}")
        if name not in LOSSES:
            raise ValueError(f"{text!r}: unknown loss {name!r}; choose from "
                             f"{', '.join(LOSSES)} ({_SPEC_HELP})")
        weight = 1.0
        if star:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f"{text!r}: weight {weight_text.strip()!r} of {name} is not a "
                                 f"number; {_SPEC_HELP}") from None
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"{text!r}: weight of {name} must be a positive number, got "
                                 f"{weight_text.strip()}")
        if name in (seen for _, seen in terms):
            raise ValueError(f"{text!r} names {name} twice; give it one weight instead")
        terms.append((weight, name))
    return terms


def loss_spec(text: str) -> str:
    """``argparse`` type of ``--loss-type``: the spec in a canonical spelling (``"0.5*ce+dice"``;
    a plain string, so settings.json records it), or an argparse error naming the problem."""
    try:
        terms = parse_loss_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return "+".join(name if weight == 1 else f"{weight:g}*{name}" for weight, name in terms)


def top_k_fraction(text: str) -> float:
    """``argparse`` type of ``--ohem-top-k``: a fraction in ``(0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1], e.g. 0.2")
    return value


def build_loss(
    name: str = "ce",
    ignore_index: int = 255,
    weight: Tensor | None = None,
    gamma: float = 2.0,
    top_k: float = DEFAULT_TOP_K,
) -> nn.Module:
    """Build a loss, or a weighted sum of losses, from its spec.

    Args:
        name: a spec for :func:`parse_loss_spec`: one of :data:`LOSSES` (``"ce"``, ``"focal"``,
            ``"dice"``, ``"lovasz"``, ``"ohem"``) or a sum such as ``"ce+dice"``.
        ignore_index: target value that is neither learned nor scored.
        weight: ``(C,)`` class weights or ``None``, given to every term.
        gamma: focal-loss focusing exponent (``>= 0``); used by ``"focal"`` only.
        top_k: fraction of scored pixels ``"ohem"`` keeps, in ``(0, 1]``.

    Returns:
        The loss module of a single unweighted name, else a :class:`WeightedSumLoss`.

    Raises:
        ValueError: a malformed spec or unknown name (the message lists the choices), a negative
            ``gamma`` or a ``top_k`` outside ``(0, 1]``.
    """
    terms = parse_loss_spec(name)
    losses = [(term_weight, _single_loss(term, ignore_index, weight, gamma, top_k))
              for term_weight, term in terms]
    if len(losses) == 1 and losses[0][0] == 1:
        return losses[0][1]
    return WeightedSumLoss(losses)


def _single_loss(name: str, ignore_index: int, weight: Tensor | None, gamma: float,
                 top_k: float) -> nn.Module:
    if name in ("ce", "focal"):
        return SegmentationLoss(ignore_index=ignore_index, weight=weight,
                                gamma=gamma if name == "focal" else 0.0)
    if name == "dice":
        return DiceLoss(ignore_index=ignore_index, weight=weight)
    if name == "lovasz":
        return LovaszSoftmaxLoss(ignore_index=ignore_index, weight=weight)
    return OhemCrossEntropyLoss(ignore_index=ignore_index, weight=weight, top_k=top_k)


class OutputsLoss(nn.Module):
    """The training loss of a model's output dict: ``criterion(out) + aux_weight *
    criterion(aux)`` when the auxiliary head's ``"aux"`` logits are there, else
    ``criterion(out)``. Logits are scored in fp32 whatever the autocast precision.

    Args:
        criterion: the per-pixel loss of ``(N, C, H, W)`` logits against ``(N, H, W)`` targets.
        aux_weight: weight of the auxiliary loss.
    """

    def __init__(self, criterion: nn.Module, aux_weight: float = 0.5) -> None:
        super().__init__()
        self.criterion, self.aux_weight = criterion, aux_weight

    def forward(self, outputs: dict[str, Tensor], target: Tensor) -> Tensor:
        loss = self.criterion(outputs["out"].float(), target)
        if "aux" in outputs:
            loss = loss + self.aux_weight * self.criterion(outputs["aux"].float(), target)
        return loss


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; training stops without saving the bad weights."""
