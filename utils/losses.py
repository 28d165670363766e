"""Per-pixel segmentation losses: cross-entropy and focal loss, both ignoring one label value.

Both losses are computed per pixel and averaged over the pixels that are scored (target different
from ``ignore_index``), weighted by the class weights when given, exactly like
:func:`torch.nn.functional.cross_entropy`'s weighted mean. The mean is never divided again by the
batch size, and the focal term is applied to every pixel, not to the batch-mean loss.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: Names accepted by :func:`build_loss` (``train.py`` takes its ``--loss`` choices from here).
LOSSES = ("ce", "focal")


class SegmentationLoss(nn.Module):
    """Cross-entropy (``gamma == 0``) or focal loss (``gamma > 0``) over pixels.

    For a scored pixel with true class ``t`` and softmax probability ``p_t``:
    ``loss = -w[t] * (1 - p_t) ** gamma * log(p_t)``; the result is
    ``sum(loss) / sum(w[t])`` over scored pixels (``w[t] = 1`` without class weights).
    Focal loss: Lin et al., https://arxiv.org/abs/1708.02002.

    Args:
        ignore_index: target value of pixels that are neither learned nor scored.
        weight: ``(C,)`` non-negative class weights, or ``None`` for equal weights.
        gamma: focusing exponent, ``>= 0``; ``0`` gives plain cross-entropy.
    """

    def __init__(self, ignore_index: int = 255, weight: Tensor | None = None, gamma: float = 0.0):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.dim() != 1 or bool((weight < 0).any()):
                raise ValueError(
                    f"class weights must be a 1-D tensor of non-negative values, got shape "
                    f"{tuple(weight.shape)}"
                )
        self.ignore_index = ignore_index
        self.gamma = float(gamma)
        # A buffer so the weights follow .to(device); not persistent because the loss is rebuilt
        # from the settings, never restored from a checkpoint.
        self.register_buffer("weight", weight, persistent=False)

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
        if logits.dim() != 4 or target.dim() != 3 or logits.shape[2:] != target.shape[1:] or (
            logits.shape[0] != target.shape[0]
        ):
            raise ValueError(
                f"expected logits (N, C, H, W) and target (N, H, W) of the same N, H, W; got "
                f"{tuple(logits.shape)} and {tuple(target.shape)} (upsample the logits first)"
            )
        num_classes = logits.shape[1]
        if self.weight is not None and self.weight.numel() != num_classes:
            raise ValueError(
                f"{self.weight.numel()} class weights given for logits with {num_classes} classes"
            )
        log_probs = F.log_softmax(logits.float(), dim=1)
        scored = target != self.ignore_index
        # Ignored pixels get class 0 only so that gather has a valid index; their weight is 0.
        safe_target = torch.where(scored, target, torch.zeros_like(target))
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
        weighted = "yes" if self.weight is not None else "no"
        return f"ignore_index={self.ignore_index}, gamma={self.gamma}, class_weights={weighted}"


def build_loss(
    name: str = "ce",
    ignore_index: int = 255,
    weight: Tensor | None = None,
    gamma: float = 2.0,
) -> SegmentationLoss:
    """Build a loss by name.

    Args:
        name: one of :data:`LOSSES`: ``"ce"`` (cross-entropy) or ``"focal"``.
        ignore_index: target value that is neither learned nor scored.
        weight: ``(C,)`` class weights or ``None``.
        gamma: focal-loss focusing exponent (``>= 0``); unused by ``"ce"``.

    Raises:
        ValueError: unknown ``name`` (the message lists the choices) or negative ``gamma``.
    """
    if name == "ce":
        return SegmentationLoss(ignore_index=ignore_index, weight=weight, gamma=0.0)
    if name == "focal":
        return SegmentationLoss(ignore_index=ignore_index, weight=weight, gamma=gamma)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


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
