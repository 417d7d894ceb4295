"""AnomalyCLIP's training losses (method §6).

The local loss (focal + two dice terms per layer, scaled by lambda = 4) supervises the
anomaly maps, the global loss (cross-entropy) the image score. :func:`anomalyclip_loss` is the
whole objective that ``train.py`` optimises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOCAL_LOSS_WEIGHT = 4.0


class FocalLoss(nn.Module):
    """Focal loss on probabilities (no softmax inside), gamma 2, alpha 1 for every class.

    The one-hot target is clamped to ``[smooth, 1 - smooth]`` and ``smooth`` is added to the
    probability of the target class before the log, as in the released code.
    """

    def __init__(self, gamma: float = 2.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.gamma = gamma
        self.smooth = smooth

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean focal loss.

        Args:
            probs: ``(B, C, ...)`` class probabilities.
            target: ``(B, ...)`` or ``(B, 1, ...)`` class indices (0/1 for the maps).
        """
        num_classes = probs.shape[1]
        flat = probs.reshape(probs.shape[0], num_classes, -1).permute(0, 2, 1).reshape(-1, num_classes)
        one_hot = F.one_hot(target.reshape(-1).long(), num_classes).to(flat.dtype)
        one_hot = one_hot.clamp(self.smooth / (num_classes - 1), 1.0 - self.smooth)
        pt = (one_hot * flat).sum(1) + self.smooth
        return (-torch.pow(1 - pt, self.gamma) * pt.log()).mean()


class BinaryDiceLoss(nn.Module):
    """``1 - mean over images of (2 sum(p g) + 1) / (sum p + sum g + 1)``."""

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = target.shape[0]
        probs_flat = probs.reshape(batch, -1)
        target_flat = target.reshape(batch, -1)
        dice = (2 * (probs_flat * target_flat).sum(1) + 1) / (probs_flat.sum(1) + target_flat.sum(1) + 1)
        return 1 - dice.sum() / batch


@dataclass
class LossTerms:
    """The objective and its parts.

    Attributes:
        total: ``local + image``, what is back-propagated.
        local: ``lambda * sum over layers (focal + dice_abnormal + dice_normal)``.
        image: Cross-entropy of the image logits.
    """

    total: torch.Tensor
    local: torch.Tensor
    image: torch.Tensor


_focal = FocalLoss()
_dice = BinaryDiceLoss()


def layer_loss_parts(similarity_map: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Focal and dice terms of one layer's ``(B, 2, S, S)`` probabilities against ``(B, S, S)`` 0/1 masks."""
    return {
        "focal": _focal(similarity_map, gt),
        "dice_anomaly": _dice(similarity_map[:, 1], gt),
        "dice_normal": _dice(similarity_map[:, 0], 1 - gt),
    }


def anomalyclip_loss(
    image_logits: torch.Tensor,
    similarity_maps: Sequence[torch.Tensor],
    labels: torch.Tensor,
    gt_masks: torch.Tensor,
    local_weight: float = LOCAL_LOSS_WEIGHT,
) -> LossTerms:
    """AnomalyCLIP's training objective (method §6).

    Args:
        image_logits: ``(B, 2)`` from :func:`AnomalyCLIP_lib.scoring.image_logits`.
        similarity_maps: ``(B, 2, S, S)`` per layer from :func:`AnomalyCLIP_lib.scoring.similarity_maps`.
        labels: ``(B,)`` image labels 0/1.
        gt_masks: ``(B, S, S)`` binary masks (float).
        local_weight: lambda, 4 in the released configuration.
    """
    image_loss = F.cross_entropy(image_logits, labels.long())
    local = torch.zeros((), device=image_logits.device)
    for similarity_map in similarity_maps:
        parts = layer_loss_parts(similarity_map, gt_masks)
        local = local + parts["focal"] + parts["dice_anomaly"] + parts["dice_normal"]
    local = local * local_weight
    return LossTerms(total=local + image_loss, local=local, image=image_loss)
