"""The two training phases of an extension.

Head phase (the warm-up, and all of `train="heads"`): the backbone is frozen, so each patch's global
image feature and 8-channel voxel feature are computed once into a `FeaturePool` and the new LPG rows
train on them for many cheap steps (no backbone forward or backward per step).

The class heads are pointwise (1x1x1) functions of the voxel feature, so their loss over a patch can
be estimated on a uniform random sample of its voxels (`loss_voxels` per patch; BCE's mean is then
unbiased and the Dice sums are estimated in proportion). Both phases do this: it makes the pool a
few MB and removes most of the cost of the heads at full resolution (with 10 classes at 96^3 they
cost about as much as the decoder); the backbone still sees whole patches.

Main phase (`heads+decoder`, `all`): ordinary training of the chosen parameters on fresh patches,
with ground truth for the new classes and, unless `use_pseudo` is False (the naive baseline), the
base model's soft pseudo-labels for the old ones, through the partial-label loss (BCE + batch Dice,
summed over classes; soft targets are fine for both terms).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from UniversalSegLib.continual.control import Reporter
from UniversalSegLib.continual.patches import PatchSampler
from UniversalSegLib.continual.trainable import frozen_backbone, trainable
from UniversalSegLib.model import UniversalModel, apply_dynamic_heads
from UniversalSegLib.train.losses import PartialLabelLoss


@dataclass
class TrainPlan:
    """How long and how to train (steps are optimiser steps; time limits are in seconds)."""

    mode: str = "heads+decoder"
    steps: int = 60
    warmup_steps: int = 100
    lr: float = 1e-4
    head_lr: float = 1e-3
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (96, 96, 96)
    pool_size: int = 16
    old_classes_per_step: int | None = 8
    loss_voxels: int | None = 32768  # per patch; None = every voxel
    time_budget_s: float | None = None
    weight_decay: float = 1e-5
    grad_clip: float = 12.0
    seed: int = 0


@dataclass
class PoolEntry:
    image_feature: torch.Tensor  # (256,)
    voxel_feature: torch.Tensor  # (8, S) float16 at S sampled voxels
    targets: torch.Tensor  # (K_new, S) uint8
    annotated: torch.Tensor  # (K_new,) bool


class FeaturePool(list):
    """Frozen-backbone features of fixed patches (a list of PoolEntry)."""


def voxel_sample(total: int, count: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """Indices of `count` distinct voxels out of `total` (None: use them all)."""
    if count is None or count >= total:
        return None
    return torch.randperm(total, generator=generator)[:count]


@torch.no_grad()
def build_pool(model: UniversalModel, sampler: PatchSampler, count: int, device: torch.device,
               reporter: Reporter, label: str, loss_voxels: int | None = None, seed: int = 0) -> FeaturePool:
    """Run the (frozen) backbone once over `count` sampled patches and keep what the heads need."""
    was_training = model.training
    model.eval()
    pool = FeaturePool()
    generator = torch.Generator().manual_seed(seed)
    try:
        for i in range(count):
            reporter.update(i / count, f"{label}: backbone features of patch {i + 1}/{count}")
            image, new, annotated, _ = sampler.sample()
            feat, voxel = model.features(torch.from_numpy(image)[None].to(device))
            voxel = voxel[0].flatten(1).cpu()
            targets = torch.from_numpy(new).to(torch.uint8).flatten(1)
            sel = voxel_sample(voxel.shape[1], loss_voxels, generator)
            if sel is not None:
                voxel, targets = voxel[:, sel], targets[:, sel]
            pool.append(PoolEntry(feat[0].cpu(), voxel.half(), targets, torch.from_numpy(annotated)))
    finally:
        model.train(was_training)
    return pool


def _pool_logits(model: UniversalModel, entries: Sequence[PoolEntry], rows: torch.Tensor, device) -> torch.Tensor:
    feat = torch.stack([e.image_feature for e in entries]).to(device)
    voxel = torch.stack([e.voxel_feature for e in entries]).to(device).float()
    return apply_dynamic_heads(voxel, model.head_parameters(feat, rows), model.head_class_chunk)


def _pool_targets(entries: Sequence[PoolEntry], channels: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    targets = torch.stack([e.targets[list(channels)] for e in entries]).to(device).float()  # (B, n, S)
    annotated = torch.stack([e.annotated[list(channels)] for e in entries]).to(device)
    return targets, annotated


def _cosine(fraction: float, warmup: float = 0.0) -> float:
    """Learning-rate factor: linear ramp over the first `warmup` fraction, then cosine to zero."""
    if fraction < warmup:
        return (fraction + 1e-3) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / max(1e-9, 1 - warmup))))


class _Clock:
    """Progress as a fraction of a step count or of a time budget, whichever ends first."""

    def __init__(self, steps: int, budget_s: float | None):
        self.steps, self.budget, self.t0 = steps, budget_s, time.perf_counter()

    def fraction(self, step: int) -> float:
        by_steps = step / self.steps if self.steps > 0 else 1.0
        if self.budget is None:
            return by_steps
        return max(by_steps, (time.perf_counter() - self.t0) / self.budget)

    def done(self, step: int) -> bool:
        return self.fraction(step) >= 1.0


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, freezer, clip: tuple | None, step: int, clock: _Clock,
          reporter: Reporter, label: str) -> int:
    """One optimiser step (optionally clipping (params, max_norm)), frozen parts restored, progress reported."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(*clip)
    opt.step()
    freezer.restore()
    step += 1
    value = loss.detach().item()
    reporter.step(step, value)
    reporter.update(clock.fraction(step), f"{label}: step {step}, loss {value:.3f}")
    return step


def train_heads(model: UniversalModel, pool: FeaturePool, rows: Sequence[int], channels: Sequence[int],
                first_new: int, plan: TrainPlan, steps: int, reporter: Reporter, device: torch.device,
                budget_s: float | None = None, label: str = "warm-up") -> int:
    """Train the LPG rows `rows` (each against target channel `channels[i]`) on the pool; returns steps done."""
    loss_fn = PartialLabelLoss()
    rng = np.random.default_rng(plan.seed + 1)
    rows_t = torch.as_tensor(list(rows), device=device)
    with trainable(model, "warmup", "", first_new) as (params, freezer):
        opt = torch.optim.AdamW(params, lr=plan.head_lr, weight_decay=plan.weight_decay)
        clock, step = _Clock(steps, budget_s), 0
        while not clock.done(step):
            for group in opt.param_groups:
                group["lr"] = plan.head_lr * _cosine(clock.fraction(step))
            batch = [pool[int(i)] for i in rng.choice(len(pool), min(plan.batch_size, len(pool)), replace=False)]
            targets, annotated = _pool_targets(batch, channels, device)
            loss = loss_fn(_pool_logits(model, batch, rows_t, device), targets, annotated).total
            step = _step(opt, loss, freezer, None, step, clock, reporter, label)
    return step


@torch.no_grad()
def score_rows(model: UniversalModel, pool: FeaturePool, rows: Sequence[int], channels: Sequence[int],
               device: torch.device, threshold: float = 0.5) -> list[dict[str, float]]:
    """Dice (summed over the pool) and mean loss of each row against its target channel."""
    loss_fn = PartialLabelLoss()
    inter = np.zeros(len(rows))
    total = np.zeros(len(rows))
    losses = np.zeros(len(rows))
    rows_t = torch.as_tensor(list(rows), device=device)
    for entry in pool:
        logits = _pool_logits(model, [entry], rows_t, device)
        targets, annotated = _pool_targets([entry], channels, device)
        pred = (torch.sigmoid(logits) > threshold).float() * annotated[..., None]
        gt = targets * annotated[..., None]
        inter += (pred * gt).flatten(2).sum((0, 2)).cpu().numpy()
        total += (pred.flatten(2).sum((0, 2)) + gt.flatten(2).sum((0, 2))).cpu().numpy()
        terms = loss_fn(logits, targets, annotated)
        losses += (terms.bce + terms.dice).cpu().numpy()
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1e-9), 1.0)
    return [{"dice": float(d), "loss": float(v / max(1, len(pool)))} for d, v in zip(dice, losses)]


def _old_subset(pseudo: torch.Tensor, count: int | None, rng: np.random.Generator) -> np.ndarray:
    """Old classes supervised this step: those present in the batch first, topped up at random."""
    n_old = pseudo.shape[1]
    if count is None or count >= n_old:
        return np.arange(n_old)
    present = np.flatnonzero((pseudo.flatten(2) > 0.5).any(2).any(0).numpy())
    absent = np.setdiff1d(np.arange(n_old), present)
    chosen = rng.permutation(present)[:count]
    extra = rng.permutation(absent)[: count - len(chosen)]
    return np.sort(np.concatenate([chosen, extra]).astype(int))


def _sampled_logits(model: UniversalModel, image: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                    count: int | None, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets (B, n, S) at `count` random voxels of the patch (the heads are pointwise)."""
    image_feature, voxel_feature = model.features(image)
    voxel_feature, targets = voxel_feature.flatten(2), targets.flatten(2)
    sel = voxel_sample(voxel_feature.shape[2], count, generator)
    if sel is not None:
        sel = sel.to(image.device)
        voxel_feature, targets = voxel_feature[:, :, sel], targets[:, :, sel]
    params = model.head_parameters(image_feature, idx)
    return apply_dynamic_heads(voxel_feature, params, model.head_class_chunk), targets


def train_main(model: UniversalModel, sampler: PatchSampler, plan: TrainPlan, n_old: int, n_new: int, backbone: str,
               use_pseudo: bool, reporter: Reporter, device: torch.device, steps: int | None = None,
               budget_s: float | None = None, label: str = "training") -> int:
    """Train `plan.mode`'s parameters on fresh patches; returns the optimiser steps done."""
    loss_fn = PartialLabelLoss()
    rng = np.random.default_rng(plan.seed + 2)
    generator = torch.Generator().manual_seed(plan.seed + 2)
    new_rows = torch.arange(n_old, n_old + n_new)
    model.train()
    with trainable(model, plan.mode, backbone, n_old) as (params, freezer):
        heads = [p for n, p in model.named_parameters() if n.startswith("lpg.") and p.requires_grad]
        rest = [p for p in params if all(p is not h for h in heads)]
        head_lr = plan.lr if plan.mode == "all" else plan.head_lr  # old rows train too in "all": gently
        groups = [{"params": heads, "lr": head_lr, "base": head_lr},
                  {"params": rest, "lr": plan.lr, "base": plan.lr}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=plan.weight_decay)
        clock, step = _Clock(steps or plan.steps, budget_s), 0
        while not clock.done(step):
            factor = _cosine(clock.fraction(step), warmup=0.1)
            for group in opt.param_groups:
                group["lr"] = group["base"] * factor
            batch = sampler.batch(plan.batch_size)
            targets, annotated = batch.new, batch.annotated
            idx = new_rows
            if use_pseudo and batch.pseudo is not None:
                old = _old_subset(batch.pseudo, plan.old_classes_per_step, rng)
                idx = torch.cat([torch.as_tensor(old), new_rows])
                targets = torch.cat([batch.pseudo[:, old], targets], 1)
                annotated = torch.cat([torch.ones(len(targets), len(old), dtype=torch.bool), annotated], 1)
            logits, targets = _sampled_logits(model, batch.image.to(device), idx.to(device), targets.to(device),
                                              plan.loss_voxels, generator)
            loss = loss_fn(logits, targets, annotated.to(device)).total
            step = _step(opt, loss, freezer, (params, plan.grad_clip), step, clock, reporter, label)
    model.eval()
    return step


def uses_pool_only(mode: str) -> bool:
    """`heads` trains entirely on the feature pool (the backbone never changes)."""
    return frozen_backbone(mode)
