"""Validation: Dice and normalised surface Dice per class per dataset on whole cases, on the shipped path.

Two kinds of case, one inference:
- `validate` (training): cases already preprocessed into model space. Each runs through
  `predict`'s own sliding window and stitching (`inference.sliding_window`: its windows, its
  Gaussian weights, logits blended and then the sigmoid), only for the classes its dataset
  annotates; probability > threshold gives the masks on the model grid.
- `validate_images`: cases on their own grid (a CT in HU and its label masks). Each runs through
  `predict` itself (preprocessing, windows, restoration to the input grid, post-processing rules),
  so the Dice is the Dice of the masks a user gets.
MONAI's metrics score the masks against the labels.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice
from torch import nn

from UniversalSegLib.inference.sliding_window import class_probabilities

if TYPE_CHECKING:
    from UniversalSegLib.store import LoadedModel


@dataclass
class ClassScore:
    """One class on one validation case (1.0 where both masks are empty; NaN where undefined)."""

    dataset: str
    case: str
    class_key: str
    dice: float
    nsd: float


def predict_case(model: nn.Module, image: torch.Tensor, classes: torch.Tensor | Sequence[int],
                 patch_size: Sequence[int], device: torch.device, overlap: float = 0.25, sw_batch_size: int = 1,
                 amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sigmoid probabilities (n, *spatial) on the CPU for `classes` of one (1, *spatial) model-space image,
    by `predict`'s sliding window and stitching (`sliding_window.class_probabilities`).

    Args:
        model: a UniversalModel (or one wrapped in DistributedDataParallel).
        image: the preprocessed image, (1, *spatial).
        classes: indices into the model's classes.
        patch_size, overlap, sw_batch_size: the windows.
        amp_dtype: mixed precision when set (on CUDA float16, on CPU bfloat16, as `predict` runs).
    """
    net = getattr(model, "module", model)  # DDP: the model itself
    volume = np.ascontiguousarray(torch.as_tensor(image, dtype=torch.float32)[0].cpu().numpy())
    positions = [int(c) for c in torch.as_tensor(classes).flatten().tolist()]
    probs = torch.zeros((len(positions), *volume.shape))
    with torch.inference_mode():
        for position, values in class_probabilities(net, volume, positions, patch_size, overlap, device,
                                                    sw_batch_size=sw_batch_size, amp=amp_dtype is not None):
            probs[position] = torch.from_numpy(values)
    return probs


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


def validate_images(model: LoadedModel, cases: Iterable[dict], device: torch.device | str = "cpu",
                    tolerance_mm: float = 2.0, **predict_options) -> list[ClassScore]:
    """Score cases on their own grid through `predict`: the Dice of the masks a user gets.

    Args:
        model: the model (and its manifest) to run; trained weights in place, as `predict` takes it.
        cases: dicts with "image" (a SimpleITK CT in HU), "labels" ({class key: bool (z, y, x) on the
            image's grid}), "dataset" and "case" names.
        device: where `predict` runs.
        tolerance_mm: the NSD tolerance.
        predict_options: more `predict` settings (e.g. postprocess=False, fast=True).
    """
    from UniversalSegLib.inference.predict import predict

    was_training = model.model.training
    scores: list[ClassScore] = []
    try:
        for case in cases:
            keys = list(case["labels"])
            result = predict(case["image"], model=model, classes=keys, device=device, **predict_options)
            pred = np.stack([result[k].mask for k in keys]).astype(np.float32)
            label = np.stack([np.asarray(case["labels"][k], dtype=np.float32) for k in keys])
            spacing = tuple(reversed(case["image"].GetSpacing()))  # (z, y, x), as the arrays
            dice, nsd = score_case(torch.from_numpy(pred), torch.from_numpy(label), spacing, tolerance_mm)
            scores += [ClassScore(str(case["dataset"]), str(case["case"]), k, d, n) for k, d, n in zip(keys, dice, nsd)]
    finally:
        model.model.train(was_training)
    return scores
