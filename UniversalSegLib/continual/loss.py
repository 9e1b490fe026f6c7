"""Soft BCE + soft Dice for extension: hard ground truth for new classes, probabilities for old ones.

Per class: binary cross-entropy (targets may be any value in [0, 1]) plus a Dice loss computed
over the whole batch (MultiTalent), summed over the supervised classes. The Dice term is skipped
for a class whose batch holds (almost) no target mass: there it carries no overlap information,
only noise, while BCE already pushes the prediction towards zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_EPS = 1e-5
MIN_TARGET_MASS = 1.0  # voxels' worth of target before the Dice term is used


def soft_bce_dice(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """logits, targets (B, C, *spatial); weights (B, C) 1/0 marks which (sample, class) pairs count.

    Returns the sum over classes of (mean BCE + batch Dice loss); 0 when nothing is supervised.
    """
    b, c = logits.shape[:2]
    logits = logits.float().reshape(b, c, -1)
    targets = targets.float().reshape(b, c, -1)
    w = torch.ones(b, c, device=logits.device) if weights is None else weights.float().to(logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)  # (B, C)
    counted = w.sum(0)  # samples supervising each class
    bce = (bce * w).sum(0) / counted.clamp(min=1)
    prob = torch.sigmoid(logits) * w[..., None]
    t = targets * w[..., None]
    inter, p_sum, t_sum = (prob * t).sum((0, 2)), prob.sum((0, 2)), t.sum((0, 2))
    dice = 1 - (2 * inter + DICE_EPS) / (p_sum + t_sum + DICE_EPS)
    dice = torch.where(t_sum >= MIN_TARGET_MASS, dice, torch.zeros_like(dice))
    return ((bce + dice) * (counted > 0)).sum()
