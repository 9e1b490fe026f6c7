"""Validation during training: Dice and normalised surface Dice per class per dataset on whole cases.

Each validation case is run through MONAI's sliding-window inference (Gaussian blending) at the
training patch size, only for the classes its dataset annotates; sigmoid > threshold gives the
masks, and MONAI's metrics score them against the labels. This deliberately does not use the
production inference pipeline (UniversalSegLib.inference): validation runs on cases that are
already preprocessed into model space.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_surface_dice
from torch import nn


@dataclass
class ClassScore:
    """One class on one validation case (1.0 where both masks are empty; NaN where undefined)."""

    dataset: str
    case: str
    class_key: str
    dice: float
    nsd: float


@torch.no_grad()
def predict_case(model: nn.Module, image: torch.Tensor, classes: torch.Tensor, patch_size: Sequence[int],
                 device: torch.device, overlap: float = 0.25, sw_batch_size: int = 1,
                 amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sigmoid probabilities (n, *spatial) on the CPU for `classes` of one (1, *spatial) image."""

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return torch.sigmoid(model(x, classes).float())

    x = torch.as_tensor(image, dtype=torch.float32)[None]
    probs = sliding_window_inference(x, list(patch_size), sw_batch_size, predictor, overlap=overlap,
                                     mode="gaussian", sw_device=device, device="cpu")
    return probs[0]


def score_case(probs: torch.Tensor, label: torch.Tensor, spacing: Sequence[float], tolerance_mm: float,
               threshold: float = 0.5) -> tuple[list[float], list[float]]:
    """Dice and NSD (tolerance in mm) per class for probabilities and labels of shape (n, *spatial)."""
    pred = (probs > threshold).float()[None]
    gt = (torch.as_tensor(label) > 0.5).float()[None]
    dice = compute_dice(pred, gt, include_background=True, ignore_empty=False)[0]
    with warnings.catch_warnings():  # MONAI warns about every empty mask; NaN/0 already say it
        warnings.simplefilter("ignore")
        nsd = compute_surface_dice(pred, gt, [tolerance_mm] * pred.shape[1], include_background=True,
                                   spacing=[float(s) for s in spacing])[0]
    # Both masks empty: a correct "absent", scored 1 like MONAI's Dice does (NSD would be NaN).
    both_empty = (pred.flatten(2).sum(2) == 0) & (gt.flatten(2).sum(2) == 0)
    nsd = torch.where(both_empty[0], torch.ones_like(nsd), nsd)
    return [float(d) for d in dice], [float(n) for n in nsd]


def validate(model: nn.Module, cases: Iterable[dict], class_keys: Sequence[str], patch_size: Sequence[int],
             spacing: Sequence[float], device: torch.device, tolerance_mm: float = 2.0, overlap: float = 0.25,
             sw_batch_size: int = 1, threshold: float = 0.5, amp_dtype: torch.dtype | None = None) -> list[ClassScore]:
    """Score every annotated class of every case.

    A case is a dict with "image" (1, *spatial), "label" (K, *spatial) multi-hot in the model's
    class order, "annotated" (K,) bool, "dataset" and "case" names (the format of
    data.loader.build_validation_cases), optionally its own "spacing".
    """
    was_training = model.training
    model.eval()
    scores: list[ClassScore] = []
    try:
        for case in cases:
            annotated = torch.as_tensor(np.asarray(case["annotated"]), dtype=torch.bool)
            idx = torch.nonzero(annotated).flatten()
            if idx.numel() == 0:
                continue
            probs = predict_case(model, case["image"], idx.to(device), patch_size, device, overlap, sw_batch_size,
                                 amp_dtype)
            label = torch.as_tensor(np.asarray(case["label"]))[idx.numpy()]
            dice, nsd = score_case(probs, label, case.get("spacing", spacing), tolerance_mm, threshold)
            for j, k in enumerate(idx.tolist()):
                scores.append(ClassScore(str(case["dataset"]), str(case["case"]), class_keys[k], dice[j], nsd[j]))
    finally:
        model.train(was_training)
    return scores


def summarise(scores: Iterable[ClassScore]) -> dict[tuple[str, str], tuple[float, float]]:
    """Mean (Dice, NSD) per (dataset, class) over cases, ignoring undefined values."""
    groups: dict[tuple[str, str], list[ClassScore]] = defaultdict(list)
    for s in scores:
        groups[(s.dataset, s.class_key)].append(s)
    return {key: (_nanmean([s.dice for s in group]), _nanmean([s.nsd for s in group]))
            for key, group in sorted(groups.items())}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
