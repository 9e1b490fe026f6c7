"""The training loop: AdamW + warm-up/cosine, masked partial-label loss, AMP, DDP, checkpoints, logs.

`Trainer` works on any dataset of sample dicts
    {"image": (1, D, H, W) float, "label": (K, D, H, W) multi-hot, "annotated": (K,) bool, "dataset": str, ...}
either map-style (sharded across ranks by a DistributedSampler) or iterable (the caller builds it
with a different seed on each rank). Data-stream randomness is kept apart from the model-side RNG,
and an interrupted epoch is replayed up to the saved step on resume, so a resumed run continues
exactly where the checkpoint left it when the data items are a deterministic function of the
dataset's seed, epoch and index.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from UniversalSegLib.errors import InputError, UniversalSegError
from UniversalSegLib.store import Manifest, save_model
from UniversalSegLib.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from UniversalSegLib.train.config import TrainSettings, class_key
from UniversalSegLib.train.distributed import DistInfo, barrier
from UniversalSegLib.train.losses import PartialLabelLoss, exclusion_loss, overlap_matrix
from UniversalSegLib.train.runlog import RunLog
from UniversalSegLib.train.validation import ClassScore, summarise, validate

CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL_DIR = "model"


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine", floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based): linear warm-up, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.amp` on this device (None: full precision)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16" and device.type != "cuda":
        raise UniversalSegError("train.amp fp16 needs a CUDA device (use bf16 or off on CPU)")
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if mode == "fp16" else torch.bfloat16


def freeze_unused_parameters(model: nn.Module, patch_size: Sequence[int], device: torch.device) -> list[str]:
    """Stop training parameters the forward pass never uses (e.g. a backbone's unused final conv).

    One probe forward/backward on a single zero patch finds them. DDP requires every trainable
    parameter to receive a gradient each step, and frozen ones are also left out of the optimiser.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    x = torch.zeros(1, 1, *patch_size, device=device)
    model(x, torch.zeros(1, dtype=torch.long, device=device)).float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for p, g in zip(params, saved):
        p.grad = g
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    return unused


class _DataRNG:
    """A private RNG stream for data loading in the main process, seeded per (seed, epoch, rank).

    Entering swaps it into the global torch/numpy/random generators, leaving swaps it out again,
    so random transforms run in the main process never disturb (nor depend on) the model side.
    """

    def __init__(self, seed: int):
        # Fresh states built aside (torch.manual_seed would also reseed the CUDA generators).
        self._state = (torch.Generator().manual_seed(seed).get_state(),
                       np.random.RandomState(seed % 2**32).get_state(), random.Random(seed).getstate())
        self._outer: tuple | None = None

    def __enter__(self) -> None:
        self._outer = _get_global_rng()
        _set_global_rng(self._state)

    def __exit__(self, *exc) -> None:
        self._state = _get_global_rng()
        _set_global_rng(self._outer)


def _get_global_rng() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_global_rng(state: tuple) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


def _stream_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


class Trainer:
    """Train a UniversalModel on partially labelled data; see the module docstring for the data contract.

    model         an nn.Module called as model(images, class_indices) -> logits (B, n, *spatial)
    manifest      its manifest (checkpoints and the final model are written in our model-file format)
    train_data    map-style or iterable dataset of sample dicts
    settings      TrainSettings (steps, lr, schedule, AMP, accumulation, checkpoint cadence, ...)
    output        the run folder: checkpoints/, model/, train_log.csv, validation.csv, training_curves.png
    val_cases     whole preprocessed validation cases (a sequence, or a callable returning an iterable)
    on_step       called with the step number after each completed step (tests use it to interrupt)
    batch_transform  applied to each whole batch on the device before the step, without gradients (the
                  generalisation pipeline); re-seeded from (seed, step, rank) when it has `set_seed`,
                  so a resumed run draws what an uninterrupted one would
    weights_dtype the final model file's weights (float32, or float16 for a small shipped file)
    """

    def __init__(self, model: nn.Module, manifest: Manifest, train_data: Dataset | IterableDataset,
                 settings: TrainSettings, output: str | Path, device: torch.device | str = "cpu",
                 dist_info: DistInfo | None = None, val_cases: Sequence[dict] | Callable[[], Iterable[dict]] = (),
                 datasets: Sequence[str] = (), on_step: Callable[[int], None] | None = None,
                 batch_transform: Callable[[dict], dict] | None = None, weights_dtype: str = "float32"):
        self.settings, self.manifest = settings, manifest
        self.device = torch.device(device)
        self.dist = dist_info or DistInfo()
        self.output = Path(output)
        self.train_data, self.val_cases, self.on_step = train_data, val_cases, on_step
        self.batch_transform, self.weights_dtype = batch_transform, weights_dtype
        self.datasets = list(datasets)
        self.total_steps = settings.total_steps(self.dist.world_size)
        self.model = model.to(self.device)
        self.frozen = freeze_unused_parameters(self.model, manifest.preprocessing.patch_size, self.device)
        self.trained_rows = self._rows_of(settings.train_classes)  # None: every class trains
        self.trains = torch.ones(len(manifest.class_keys), dtype=torch.bool)  # per model row: does it train
        if self.trained_rows is not None:
            self.trains[:] = False
            self.trains[self.trained_rows] = True
        self.row_freezer = self._freeze_all_but(self.trained_rows) if self.trained_rows is not None else None
        self.net: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.loss_fn = PartialLabelLoss(settings.bce_weight, settings.dice_weight, settings.dice_smooth,
                                        empty_dice=settings.dice_on_empty)
        # pairs of classes that may share voxels; every other pair excludes (exclusion_loss)
        self.may_overlap = overlap_matrix(manifest.classes).to(self.device) if settings.exclusion_weight else None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_factor, warmup_steps=settings.warmup_steps, total_steps=self.total_steps, kind=settings.scheduler,
            floor=settings.min_lr_ratio))
        self.amp_dtype = resolve_amp(settings.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step, self.epoch, self._elapsed0 = 0, 0, 0.0
        self.log = RunLog(self.output, self.datasets) if self.dist.is_main else None
        self.last_scores: list[ClassScore] = []
        self.last_dataset_counts: dict[str, int] = {}  # samples of each dataset in the last step (this rank)
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate of the last step taken, set by train_step
        self._resume_rng = None  # checkpoint RNG to restore once the data stream is back in place

    # ----------------------------------------------------------------------------- what trains
    def _rows_of(self, names: Sequence[str] | None) -> torch.Tensor | None:
        """Model rows of `train.train_classes` (names resolved as `model.classes` resolves them)."""
        if not names:
            return None
        keys = [c.key for c in self.manifest.classes]
        rows = []
        for name in names:
            key = name if name in keys else class_key(name)
            if key not in keys:
                raise InputError(f"train.train_classes: {name!r} is not one of the model's classes")
            rows.append(keys.index(key))
        return torch.tensor(sorted(set(rows)))

    def _freeze_all_but(self, rows: torch.Tensor):
        """Only the LPG rows `rows` train: everything else gets requires_grad=False (no backward through
        the backbone), and the other classes' rows are masked and restored after each step."""
        from UniversalSegLib.continual.trainable import RowFreezer
        from UniversalSegLib.model import PerClassLPG

        if not isinstance(self.model.lpg, PerClassLPG):
            raise InputError("train.train_classes needs a per-class parameter generator (model.lpg: per_class)")
        for name, p in self.model.named_parameters():
            if not name.startswith("lpg."):
                p.requires_grad_(False)
        others = [r for r in range(self.model.lpg.num_classes) if r not in set(rows.tolist())]
        return RowFreezer(self.model.lpg, others)

    # ----------------------------------------------------------------------------- data
    def steps_per_epoch(self) -> int:
        if isinstance(self.train_data, IterableDataset):
            return self.settings.steps_per_epoch(self.dist.world_size)
        n = len(self.train_data) // self.dist.world_size // self.settings.batch_size
        if n == 0:
            raise UniversalSegError(f"the training set ({len(self.train_data)} samples) is smaller than one batch "
                                    f"per rank ({self.settings.batch_size} x {self.dist.world_size} ranks)")
        return n

    def _loader(self, epoch: int) -> DataLoader:
        s = self.settings
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(epoch)
        generator = torch.Generator().manual_seed(_stream_seed(s.seed, epoch, self.dist.rank))
        sampler = None
        if not isinstance(self.train_data, IterableDataset):
            sampler = DistributedSampler(self.train_data, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                         shuffle=True, seed=s.seed, drop_last=True)
            sampler.set_epoch(epoch)
        worker_init = None
        if s.num_workers > 0:
            from monai.data.utils import worker_init_fn as worker_init  # distinct random transforms per worker
        return DataLoader(self.train_data, batch_size=s.batch_size, sampler=sampler, num_workers=s.num_workers,
                          drop_last=True, generator=generator, worker_init_fn=worker_init,
                          pin_memory=self.device.type == "cuda")

    def _batches(self, epoch: int, skip: int) -> Iterator[dict]:
        """This rank's batches of one epoch, after replaying (and discarding) the first `skip`."""
        rng = _DataRNG(_stream_seed(self.settings.seed, epoch, self.dist.rank))
        with rng:
            iterator = iter(self._loader(epoch))
        for i in range(self.steps_per_epoch()):
            with rng:
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            if i >= skip:
                yield batch

    # ----------------------------------------------------------------------------- one step
    def _groups(self, names: Sequence[str]) -> list[list[int]]:
        """The samples of each forward/backward pass: per dataset (if asked), at most `micro_batch` each."""
        if self.settings.accumulate_per_dataset:
            by_dataset: dict[str, list[int]] = {}
            for i, n in enumerate(names):
                by_dataset.setdefault(n, []).append(i)
            groups = list(by_dataset.values())
        else:
            groups = [list(range(len(names)))]
        size = self.settings.micro_batch
        return [g[i:i + size] for g in groups for i in range(0, len(g), size)] if size else groups

    def train_step(self, batch: dict) -> tuple[float, dict[str, float]]:
        """One optimiser step on a collated batch; returns the loss and the loss of each dataset in it."""
        # The batch stays where the loader put it: each pass moves only its own samples and the
        # classes they annotate, so device memory does not grow with the batch or the class count.
        if self.batch_transform is not None:
            batch = self._transform(batch)
        images, labels = batch["image"], batch["label"]
        annotated = torch.as_tensor(batch["annotated"]).bool().cpu()
        names = [str(n) for n in batch["dataset"]]
        groups = self._groups(names)
        class_counts = annotated.sum(0)  # samples of the whole batch that annotate each class
        self.optimizer.zero_grad(set_to_none=True)
        total, sums = 0.0, {}
        for g, idx in enumerate(groups):
            last = g == len(groups) - 1
            # Under DDP, gradients are all-reduced once, on the last backward of the step.
            sync = self.net.no_sync() if (self.dist.enabled and not last) else contextlib.nullcontext()
            rows = slice(None) if len(idx) == len(names) else idx  # no copy for a single group
            with sync:
                value, parts = self._forward_backward(images[rows], labels[rows], annotated[rows],
                                                      [names[i] for i in idx], class_counts, g, len(names))
            total += value
            for name, (loss, count) in parts.items():  # sample-weighted mean over micro-batches
                acc = sums.setdefault(name, [0.0, 0])
                acc[0], acc[1] = acc[0] + loss * count, acc[1] + count
        self.scaler.unscale_(self.optimizer)
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step (the log shows it)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.row_freezer is not None:
            self.row_freezer.restore()  # weight decay would shrink the frozen classes' rows
        self.scheduler.step()
        self.last_dataset_counts = {name: acc[1] for name, acc in sums.items()}  # samples behind each loss
        return total, {name: acc[0] / acc[1] for name, acc in sums.items()}

    def _transform(self, batch: dict) -> dict:
        """The batch on the device, through `batch_transform` (seeded per step and rank)."""
        moved = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        moved["label"] = moved["label"].float()
        moved["annotated"] = moved["annotated"].bool()
        if hasattr(self.batch_transform, "set_seed"):
            self.batch_transform.set_seed(_stream_seed(self.settings.seed, self.step, self.dist.rank), per_worker=False)
        with torch.no_grad():
            return self.batch_transform(moved)

    def _heads(self, annotated: torch.Tensor, group: int) -> tuple[torch.Tensor, float]:
        """The class heads one pass runs, and the factor that keeps the exclusion loss's expected scale.

        Only the classes some sample annotates get a loss (never none, so every parameter stays in the
        graph: DDP expects the same parameters on every rank). With the exclusion loss the unannotated
        heads also learn where they are NOT: all of them (`exclusion_classes` 0), or that many drawn at
        random per pass, weighted by (unannotated / drawn) so the expected loss is the same.
        With `train_classes`, only trained heads get a loss; frozen annotated heads still run under the
        exclusion loss, because their labels are what claims the voxels a trained head is pushed off.
        """
        some = annotated.any(0)
        if not self.settings.exclusion_weight:
            classes = torch.nonzero(some & self.trains).flatten()
            fallback = self.trained_rows[:1] if self.trained_rows is not None else torch.zeros(1, dtype=torch.long)
            return (classes if classes.numel() else fallback), 0.0
        classes = torch.nonzero(some).flatten()
        others = torch.nonzero(~some & self.trains).flatten()
        n = self.settings.exclusion_classes
        if not n or n >= len(others):
            return torch.cat([classes, others]).sort().values, 1.0
        gen = torch.Generator().manual_seed(_stream_seed(self.settings.seed, self.step, self.dist.rank) + group)
        pick = others[torch.randperm(len(others), generator=gen)[:n]]
        return torch.cat([classes, pick]).sort().values, len(others) / n

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor,
                          names: list[str], class_counts: torch.Tensor, group: int = 0,
                          batch_size: int | None = None) -> tuple[float, dict[str, tuple[float, int]]]:
        batch_size = batch_size or len(names)
        classes, exclusion_scale = self._heads(annotated, group)
        images = images.to(self.device, non_blocking=True).float()
        target = labels[:, classes].to(self.device, non_blocking=True)
        mask = annotated[:, classes].to(self.device)
        # Each class's term is weighted by this group's share of the batch's samples that annotate
        # it, so the accumulated loss is the whole batch's: a class only this group annotates keeps
        # its full weight (the loss sums over classes: a second dataset must not halve the first's
        # gradient), and a class split over micro-batches gets the batch mean of its BCE exactly.
        share = (annotated[:, classes].sum(0) / class_counts[classes].clamp(min=1)).to(self.device)
        trains = self.trains[classes].to(self.device)
        share = share * trains  # a frozen head runs only to claim voxels for the exclusion loss
        classes = classes.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.net(images, classes)
        terms = self.loss_fn(logits, target, mask, class_weight=share)
        total = terms.total
        if exclusion_scale:  # weighted by this pass's share of the batch: summed over passes, the batch mean
            overlap = self.may_overlap[classes][:, classes]
            share_of_batch = len(names) / batch_size
            total = total + self.settings.exclusion_weight * exclusion_scale * share_of_batch * exclusion_loss(
                logits, target, mask, overlap)
        self.scaler.scale(total).backward()
        parts: dict[str, tuple[float, int]] = {}
        with torch.no_grad():
            for name in dict.fromkeys(names):
                rows = [i for i, n in enumerate(names) if n == name]
                one = terms if len(rows) == len(names) else self.loss_fn(logits[rows], target[rows], mask[rows])
                per_class = self.loss_fn.bce_weight * one.bce + self.loss_fn.dice_weight * one.dice  # not by share
                value = (per_class * trains).sum()
                parts[name] = (float(value), len(rows))
        return float(total.detach()), parts

    # ----------------------------------------------------------------------------- the run
    def resume(self, checkpoint: str | Path | None = None) -> bool:
        """Restore the latest (or the given) checkpoint; False when there is none."""
        path = Path(checkpoint) if checkpoint else latest_checkpoint(self.output / CHECKPOINT_DIR)
        if path is None:
            return False
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler)
        self.step, self.epoch = state.step, state.epoch
        self._elapsed0 = float(state.extra.get("elapsed", 0.0))
        self._resume_rng = state
        return True

    def fit(self, resume: bool | str | Path = False) -> nn.Module:
        """Train to `total_steps` and write the final model (main rank).

        `resume`: True continues the latest checkpoint of the run folder (from scratch if there is
        none), a path continues that checkpoint; a Trainer already `resume()`d continues as well.
        """
        resumed = self.resume(None if resume is True else resume) if resume else self.step > 0
        if self.log:
            self.log.start(self.step if resumed else None)
        torch.manual_seed(self.settings.seed)  # model-side stream (dropout, if any); replaced on resume
        self.model.train()
        start, t0 = self.step, time.perf_counter()
        bar = self._progress_bar(start)
        spe = self.steps_per_epoch()
        try:
            while self.step < self.total_steps:
                self.epoch = self.step // spe
                for batch in self._batches(self.epoch, self.step - self.epoch * spe):
                    if self._resume_rng is not None:  # the data stream is back at the saved step
                        self._resume_rng.restore_rng()
                        self._resume_rng = None
                    loss, parts = self.train_step(batch)
                    self.step += 1
                    self._after_step(loss, parts, time.perf_counter() - t0 + self._elapsed0, bar)
                    if self.step >= self.total_steps:
                        break
        finally:
            if bar is not None:
                bar.close()
        if self.dist.is_main:
            self._save_final()
        barrier()
        return self.model

    def _progress_bar(self, start: int):
        if not (self.dist.is_main and self.settings.progress):
            return None
        from UniversalSegLib.progress import bar

        return bar(total=self.total_steps, initial=start, desc=f"training {self.manifest.name}", unit="step")

    def _after_step(self, loss: float, parts: dict[str, float], elapsed: float, bar) -> None:
        if self.dist.enabled:
            loss, parts = self._reduce_losses(loss, parts)
        lr = self.last_lr
        if self.log:
            self.log.log_step(self.step, self.epoch, loss, lr, elapsed, parts)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        s, final = self.settings, self.step == self.total_steps
        if (s.val_every and self.step % s.val_every == 0) or final:
            self.run_validation()
        if (s.checkpoint_every and self.step % s.checkpoint_every == 0) or final:
            self.save_checkpoint(elapsed)
        if self.on_step is not None:
            self.on_step(self.step)

    def _reduce_losses(self, loss: float, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The step's loss as the mean over ranks, and each logged dataset's loss as the mean over all
        ranks' samples of that dataset (a rank may have none), in one all-reduce."""
        names, counts = self.datasets, self.last_dataset_counts
        values = [loss] + [parts.get(n, 0.0) * counts.get(n, 0) for n in names] + [counts.get(n, 0) for n in names]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        sums, totals = t[1:1 + len(names)].tolist(), t[1 + len(names):].tolist()
        reduced = {n: v / c for n, v, c in zip(names, sums, totals) if c > 0}
        return float(t[0]) / self.dist.world_size, reduced

    def run_validation(self) -> list[ClassScore]:
        """Dice/NSD on the validation cases (main rank; the others wait at a barrier)."""
        cases = self.val_cases() if callable(self.val_cases) else self.val_cases
        if self.dist.is_main and cases:
            pre = self.manifest.preprocessing
            self.last_scores = validate(self.model, cases, self.manifest.class_keys, pre.patch_size, pre.spacing,
                                        self.device, self.settings.nsd_tolerance_mm, self.settings.val_overlap,
                                        amp_dtype=self.amp_dtype)
            self.log.log_validation(self.step, self.last_scores)
            self.log.plot()
            self._print_scores()
        barrier()
        return self.last_scores

    def _print_scores(self) -> None:
        if not self.settings.progress:
            return
        from tqdm.auto import tqdm

        for (dataset, key), (dice, nsd) in summarise(self.last_scores).items():
            tqdm.write(f"  step {self.step} {dataset:>20} {key:28} Dice {dice:.3f}  NSD {nsd:.3f}")

    def save_checkpoint(self, elapsed: float = 0.0) -> Path | None:
        """Checkpoint the current step (main rank only) and redraw the curves."""
        path = None
        if self.dist.is_main:
            s = self.settings
            path = save_checkpoint(self.output / CHECKPOINT_DIR, self.step, self.epoch, self.model, self.manifest,
                                   self.optimizer, self.scheduler, self.scaler, extra={"elapsed": elapsed},
                                   keep_last=s.keep_checkpoints, keep_every=s.keep_checkpoint_every)
            self.log.plot()
        return path

    def _save_final(self) -> Path:
        self.manifest.provenance.update({"steps": self.step, "trained_at": datetime.now(UTC).isoformat(
            timespec="seconds"), "world_size": self.dist.world_size, "batch_size": self.settings.batch_size})
        return save_model(self.model, self.manifest, self.output / FINAL_MODEL_DIR, overwrite=True,
                          weights_dtype=self.weights_dtype)

