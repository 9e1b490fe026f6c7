"""The partial-label loss: BCE + batch Dice per class, only where the sample's dataset annotates it.

Each training dataset annotates only some classes. A (sample, class) pair whose dataset does not
annotate the class says nothing about it (an unlabelled liver is not background), so that pair
must contribute exactly zero loss and exactly zero gradient ("masked back-propagation",
Universal Model). Following MultiTalent, the per-class terms are SUMMED over classes (not
averaged, so adding datasets with other classes does not dilute each class's gradient) and the
Dice of a class is computed over the whole batch: intersections and denominators are summed over
the samples that annotate that class before the ratio is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


@dataclass
class LossTerms:
    """The total loss and its per-class parts (for logging; classes without annotation are 0)."""

    total: torch.Tensor  # scalar
    bce: torch.Tensor  # (K,)
    dice: torch.Tensor  # (K,)
    supervised: torch.Tensor  # (K,) bool: class annotated by at least one sample of the batch


class PartialLabelLoss(nn.Module):
    """BCE-with-logits + batch Dice, per class, masked by the `annotated` (B, K) flags, summed over classes.

    Args:
        bce_weight, dice_weight: factors of the two terms.
        smooth: the Dice's smoothing in numerator and denominator.
        empty_dice: also give the Dice term to a class whose annotating samples hold none of it (False:
            the BCE alone there; why: the comment in `__init__`).

    forward(logits (B, K, *spatial), target (B, K, *spatial) in {0, 1}, annotated (B, K) bool)
    -> LossTerms. The loss is computed in float32 whatever the logits' dtype (mixed precision).
    A batch where no pair is annotated gives a zero loss that still back-propagates (zero
    gradients), so distributed ranks never disagree on which parameters were used.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5,
                 empty_dice: bool = True):
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        # A class absent from every annotating sample of the batch has a Dice of smooth / (sum p + smooth):
        # a gradient of ~1/smooth per unit of probability, always downwards. With Adam and a per-class
        # parameter generator (its rows see only their own class's gradients) that tiny but constant
        # push becomes full-size steps on every empty patch and held v0.4.1's portal vein head at
        # logits below -18 (experiments/contrast_phases_2h). empty_dice=False leaves such a class to the BCE.
        self.empty_dice = empty_dice
        # Masked probabilities and targets are zero for unannotated pairs, so they add nothing to
        # the batch sums; a class nobody annotates gives 1 - smooth/smooth = 0 with zero gradient.
        self.dice = DiceLoss(sigmoid=False, batch=True, reduction="none", smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                class_weight: torch.Tensor | None = None) -> LossTerms:
        """The loss of a batch.

        Args:
            logits, target: (B, K, *spatial).
            annotated: (B, K) bool, the pairs that count.
            class_weight: optional (K,) factors on each class's term in `total` (a part of a batch
                accumulated separately passes its share of each class's samples); `bce` and `dice`
                stay unweighted.
        """
        if logits.shape != target.shape or annotated.shape != logits.shape[:2]:
            raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
                             f"annotated {tuple(annotated.shape)}")
        logits = logits.float()
        target = target.to(logits.dtype)
        mask = annotated.to(device=logits.device, dtype=torch.bool)
        weight = mask.to(logits.dtype).reshape(*mask.shape, *([1] * (logits.dim() - 2)))

        # BCE: mean over voxels per pair, then mean over the samples that annotate the class.
        bce_pair = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce_pair = (bce_pair * weight).flatten(2).mean(2)  # (B, K); unannotated pairs are 0
        per_class_count = mask.sum(0)
        bce = bce_pair.sum(0) / per_class_count.clamp(min=1)

        dice = self.dice(torch.sigmoid(logits) * weight, target * weight).reshape(-1)
        supervised = per_class_count > 0
        if not self.empty_dice:  # only classes with some foreground in the samples that annotate them
            supervised_dice = supervised & ((target * weight).flatten(2).sum((0, 2)) > 0)
        else:
            supervised_dice = supervised
        dice = dice * supervised_dice  # exactly 0 (and no gradient) for classes nobody annotates
        per_class = self.bce_weight * bce + self.dice_weight * dice
        if class_weight is not None:
            per_class = per_class * class_weight.to(per_class)
        total = per_class.sum()
        return LossTerms(total=total, bce=bce.detach(), dice=dice.detach(), supervised=supervised)


def exclusion_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                   may_overlap: torch.Tensor) -> torch.Tensor:
    """BCE towards 0 for UNannotated classes, only on voxels an annotated, unrelated class claims.

    A source that labels the heart says nothing about the spleen in general, but it does say that
    its heart voxels are not spleen: distinct structures of one label map never share voxels
    (the exclusion idea of Shi et al. 2021, marginal and exclusion losses). `may_overlap` (K, K)
    bool marks the pairs that can share voxels (a class with itself, a tumour with its organ);
    every other pair excludes. Per (sample, class) the BCE is averaged over all voxels, like
    `PartialLabelLoss`, then summed over classes and averaged over samples. Annotated pairs add
    nothing here (the partial-label loss covers them); neither do voxels no annotated class claims.

    logits, target: (B, K, *spatial); annotated: (B, K) bool. Returns a scalar.
    """
    if logits.shape != target.shape or annotated.shape != logits.shape[:2] or may_overlap.shape != (
            logits.shape[1], logits.shape[1]):
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
                         f"annotated {tuple(annotated.shape)}, may_overlap {tuple(may_overlap.shape)}")
    logits = logits.float()
    mask = annotated.to(device=logits.device, dtype=torch.bool)
    claimed = target.to(logits.dtype) * mask.to(logits.dtype).reshape(*mask.shape, *([1] * (logits.dim() - 2)))
    excludes = (~may_overlap.to(logits.device)).to(logits.dtype)
    # region[b, c] = voxels some annotated class k, exclusive with c, marks as its own
    region = torch.einsum("ck,bk...->bc...", excludes, claimed) > 0
    region &= ~mask.reshape(*mask.shape, *([1] * (logits.dim() - 2)))
    bce = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (bce * region).flatten(2).mean(2).sum(1).mean(0)


def overlap_matrix(classes) -> torch.Tensor:
    """(K, K) bool: pairs of classes (registry `ClassInfo`s, model order) that may share voxels.

    A class overlaps itself and its ancestors and descendants through `parents` (tumour and organ,
    lumen and aorta); all other pairs are distinct structures.
    """
    keys = [c.key for c in classes]
    parents = {c.key: set(c.parents) for c in classes}

    def ancestors(key: str) -> set[str]:
        seen, todo = set(), list(parents.get(key, ()))
        while todo:
            k = todo.pop()
            if k not in seen:
                seen.add(k)
                todo.extend(parents.get(k, ()))
        return seen

    up = {k: ancestors(k) for k in keys}
    return torch.tensor([[a == b or b in up[a] or a in up[b] for b in keys] for a in keys])
