"""`extend_model`: add classes to a trained model from new data only, without forgetting the old ones.

Order of work (each stage reports progress and honours cancellation; nothing is written until the end):
1. load and hash the base model; register, embed and append the new classes (one LPG MLP each);
2. read, preprocess and split the new data;
3. warm up the new heads on frozen-backbone features (with `init="auto"`: a similar-initialised and a
   fresh copy of every new head are warmed up side by side and scored on a validation slab, and the
   better one is kept);
4. unless only heads train: cache the base model's soft pseudo-labels for the old classes (one
   sliding-window pass per training case) and train on ground truth (new) + pseudo-labels (old);
   the naive baseline trains the same parameters for the same steps without the pseudo-labels;
5. score held-out Dice and retention; check the base file's hash; save the new model atomically.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from UniversalSegLib import __version__
from UniversalSegLib.continual.classes import ClassSpec, embed_new_classes, make_new_classes, most_similar
from UniversalSegLib.continual.control import Cancel, ProgressFn, Reporter, StepFn
from UniversalSegLib.continual.data import ExtensionData, load_extension_data, split_cases
from UniversalSegLib.continual.evaluate import (
    Predictor,
    heldout_image,
    retention_image,
    score_image,
    summarise_retention,
)
from UniversalSegLib.continual.patches import PatchSampler
from UniversalSegLib.continual.pseudo import PseudoLabelCache
from UniversalSegLib.continual.report import ExtensionReport
from UniversalSegLib.continual.trainable import check_mode
from UniversalSegLib.continual.trainer import TrainPlan, build_pool, score_rows, train_heads, train_main
from UniversalSegLib.device import resolve_device
from UniversalSegLib.errors import InputError, ModelFileError
from UniversalSegLib.model import PerClassLPG, UniversalModel
from UniversalSegLib.registry import ClassInfo, Registry, default_registry
from UniversalSegLib.store import LoadedModel, Manifest, load_model, save_model, sha256_file, user_model_dir

INIT_MODES = ("auto", "similar", "fresh")
DEFAULT_STEPS = 60
VAL_FRACTION = 0.2  # slab of the training data that scores similar vs fresh init in "auto"


def output_directory(output: str | Path) -> Path:
    """A bare name goes to the user model folder; anything with a path separator is a path."""
    text = str(output)
    if not text or text in (".", ".."):
        raise InputError("give a name for the new model")
    if os.sep in text or (os.altsep and os.altsep in text) or Path(text).is_absolute():
        return Path(text).expanduser()
    return user_model_dir() / text


def _extended_registry(manifest: Manifest, new: Sequence[ClassInfo]) -> Registry:
    """Registry classes + the model's own classes (it may carry user classes) + the new ones."""
    base = default_registry()
    extra = [c for c in manifest.classes if c.key not in base]
    return Registry([*base.classes, *extra, *(c for c in new if c.key not in base)], base.prompt_template)


@torch.no_grad()
def keep_rows(model: UniversalModel, rows: Sequence[int]) -> None:
    """Keep only the given class rows (embeddings and per-class LPG MLPs), in this order."""
    idx = torch.as_tensor(list(rows), device=model.class_embeddings.device)
    model.class_embeddings = model.class_embeddings[idx].clone()
    if isinstance(model.lpg, PerClassLPG):
        for name in ("w1", "b1", "w2", "b2"):
            setattr(model.lpg, name, torch.nn.Parameter(getattr(model.lpg, name)[idx].clone()))


def _resolve_steps(steps: int | None, epochs: float | None, time_budget_s: float | None, data: ExtensionData,
                   plan: TrainPlan) -> int:
    if steps is not None and epochs is not None:
        raise InputError("give steps or epochs, not both")
    if epochs is not None:
        voxels = sum(int(np.prod(c.shape)) for c in data.train)
        per_epoch = max(1, math.ceil(voxels / (int(np.prod(plan.patch_size)) * plan.batch_size)))
        return max(1, int(round(epochs * per_epoch)))
    if steps is not None:
        if steps < 0:
            raise InputError("steps must be >= 0")
        return int(steps)
    return 10**9 if time_budget_s is not None else DEFAULT_STEPS


def _patch_size(patch_size: Sequence[int] | None, manifest: Manifest, multiple: int) -> tuple[int, int, int]:
    size = list(patch_size or manifest.preprocessing.patch_size)
    if len(size) != 3 or any(int(s) < multiple or int(s) % multiple for s in size):
        raise InputError(f"patch size {size} must be 3 multiples of {multiple}")
    return tuple(int(s) for s in size)


class _Run:
    """State shared by the stages of one extension (kept out of the public signature)."""

    def __init__(self, loaded: LoadedModel, new: list[ClassInfo], emb: torch.Tensor, plan: TrainPlan,
                 device: torch.device, reporter: Reporter):
        self.loaded, self.manifest, self.new, self.emb = loaded, loaded.manifest, new, emb
        self.plan, self.device, self.reporter = plan, device, reporter
        self.base = loaded.model.to(device).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.n_old, self.n_new = self.base.num_classes, len(new)
        self.similar = most_similar(emb, self.base.class_embeddings.cpu(), self.manifest.class_keys)
        self.timing: dict[str, float] = {}
        self.init_selection: dict[str, Any] = {}
        self.notes: list[str] = []
        self.scoring_cpu = 0.0  # CPU seconds of the naive baseline and of scoring the warm-up, kept out of
        self.scoring_wall = 0.0  # the extension's figures (they only serve the report)
        self.warmup_masks: dict[str, np.ndarray] = {}

    def fresh_model(self, init: str) -> tuple[UniversalModel, list[int], list[int]]:
        """A copy of the base with the new rows; returns (model, trainable rows, their target channels)."""
        model = copy.deepcopy(self.base)
        for p in model.parameters():
            p.requires_grad_(True)
        sim = [s.index for s in self.similar]
        emb = self.emb.to(self.device)
        if init == "auto":
            model.add_classes(torch.cat([emb, emb]), sim + [None] * self.n_new)
            channels = list(range(self.n_new)) * 2
        else:
            model.add_classes(emb, sim if init == "similar" else None)
            channels = list(range(self.n_new))
        return model, list(range(self.n_old, self.n_old + len(channels))), channels

    def choose_init(self, model: UniversalModel, val_pool, rows: list[int], channels: list[int]) -> list[str]:
        """Score the similar (first n_new rows) vs fresh (last n_new) heads; keep the better per class."""
        scores = score_rows(model, val_pool, rows, channels, self.device)
        keep, chosen = list(range(self.n_old)), []
        for j, info in enumerate(self.new):
            s, f = scores[j], scores[self.n_new + j]
            similar_wins = (s["dice"], -s["loss"]) > (f["dice"], -f["loss"])
            keep.append(rows[j] if similar_wins else rows[self.n_new + j])
            chosen.append("similar" if similar_wins else "fresh")
            self.init_selection[info.key] = {
                "similar_to": self.similar[j].key, "similarity": round(self.similar[j].cosine, 4),
                "similar": {k: round(v, 4) for k, v in s.items()}, "fresh": {k: round(v, 4) for k, v in f.items()},
                "chosen": chosen[-1]}
        keep_rows(model, keep)
        return chosen


def _stage_time(run: _Run, name: str, t0: float) -> None:
    run.timing[name] = round(time.perf_counter() - t0, 2)


def _warm_up(run: _Run, data: ExtensionData, init: str, warmup_steps: int, budget: float | None):
    """Stage 3: returns (model, init per class, warm-up steps done, feature pool for `train="heads"`)."""
    t0 = time.perf_counter()
    plan, rep = run.plan, run.reporter
    model, rows, channels = run.fresh_model(init)
    fit, val = data.train, []
    if init == "auto":
        try:
            fit, val, how = split_cases(data.train, VAL_FRACTION, min_slices=4)
            run.init_selection["validation"] = how
        except InputError:
            run.notes.append("training data too small for a validation slab: init chosen on training patches")
    sampler = PatchSampler(fit, plan.patch_size, seed=plan.seed)
    rep.stage(0.05, 0.15)
    pool = build_pool(model, sampler, plan.pool_size, run.device, rep, "warm-up", plan.loss_voxels, plan.seed)
    rep.stage(0.15, 0.25)
    done = train_heads(model, pool, rows, channels, run.n_old, plan, warmup_steps, rep, run.device, budget)
    if init == "auto":
        val_pool = pool
        if val:
            rep.stage(0.25, 0.28)
            val_pool = build_pool(model, PatchSampler(val, plan.patch_size, seed=plan.seed + 7, augment=False),
                                  max(2, plan.pool_size // 2), run.device, rep, "init check", plan.loss_voxels,
                                  plan.seed + 7)
        inits = run.choose_init(model, val_pool, rows, channels)
        pool.extend(val_pool if val else [])
    else:
        inits = [init] * run.n_new
    _stage_time(run, "warmup", t0)
    return model, inits, done, pool


def _main_phase(run: _Run, model: UniversalModel, data: ExtensionData, pool, steps: int, budget: float | None,
                naive: bool) -> tuple[UniversalModel | None, int, dict[str, Any]]:
    """Stage 4: returns (naive model or None, steps done, pseudo-label stats)."""
    plan, rep = run.plan, run.reporter
    rows = list(range(run.n_old, run.n_old + run.n_new))
    channels = list(range(run.n_new))
    if plan.mode == "heads":
        t0 = time.perf_counter()
        rep.stage(0.3, 0.85)
        done = train_heads(model, pool, rows, channels, run.n_old, plan, steps, rep, run.device, budget, "training")
        _stage_time(run, "train", t0)
        return None, done, {}
    t0 = time.perf_counter()
    cache = PseudoLabelCache(run.base, list(range(run.n_old)), plan.patch_size,
                             run.manifest.preprocessing.overlap, run.device)
    for i, case in enumerate(data.train):
        rep.stage(0.3 + 0.1 * i / len(data.train), 0.3 + 0.1 * (i + 1) / len(data.train))
        rep.update(0.0, f"pseudo-labels of the old classes on {case.case_id}")
        cache.get(case.case_id, case.image, rep.cancelled)
    _stage_time(run, "pseudo_labels", t0)
    pseudo_of = lambda c: cache.get(c.case_id, c.image, rep.cancelled)  # noqa: E731
    before = copy.deepcopy(model) if naive else None
    t0 = time.perf_counter()
    rep.stage(0.4, 0.7 if naive else 0.85)
    done = train_main(model, PatchSampler(data.train, plan.patch_size, plan.seed + 3, pseudo_of), plan, run.n_old,
                      run.n_new, run.manifest.backbone, True, rep, run.device, steps, budget)
    _stage_time(run, "train", t0)
    if before is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        rep.stage(0.7, 0.85)
        train_main(before, PatchSampler(data.train, plan.patch_size, plan.seed + 3, pseudo_of), plan, run.n_old,
                   run.n_new, run.manifest.backbone, False, rep, run.device, done, None, "naive baseline")
        _stage_time(run, "naive_baseline", t0)
        run.scoring_cpu += time.process_time() - c0
        run.scoring_wall += run.timing["naive_baseline"]
    stats = {"cases": cache.computed, "megabytes": round(cache.nbytes() / 2**20, 1)}
    return before, done, stats


def _predictor(run: _Run, eval_overlap: float) -> Predictor:
    return Predictor(run.plan.patch_size, eval_overlap, run.manifest.preprocessing.threshold, run.device,
                     run.reporter.cancelled)


def _score_warmup(run: _Run, model: UniversalModel, data: ExtensionData, eval_overlap: float) -> None:
    """New-class masks of the warmed-up heads on the held-out data, to show what the main phase adds."""
    t0, c0 = time.perf_counter(), time.process_time()
    new_rows = list(range(run.n_old, run.n_old + run.n_new))
    new_keys = [c.key for c in run.new]
    for case in data.heldout:
        run.warmup_masks[case.case_id] = _predictor(run, eval_overlap).masks(model, heldout_image(case, new_keys),
                                                                             new_rows)
    _stage_time(run, "warmup_scoring", t0)
    run.scoring_cpu += time.process_time() - c0
    run.scoring_wall += run.timing["warmup_scoring"]


def _evaluate(run: _Run, model: UniversalModel, naive: UniversalModel | None, data: ExtensionData,
              retention: Sequence[str | Path], registry: Registry, eval_overlap: float):
    """Stage 5: per-image scores on held-out new data and on the retention images."""
    t0 = time.perf_counter()
    rep = run.reporter
    predictor = _predictor(run, eval_overlap)
    new_keys = [c.key for c in run.new]
    everything = list(range(run.n_old + run.n_new))
    images = [("heldout", heldout_image(c, new_keys)) for c in data.heldout]
    images += [("retention", retention_image(r, run.manifest, registry)) for r in retention]
    heldout, kept, summary = [], [], {}
    for i, (kind, image) in enumerate(images):
        rep.stage(0.85 + 0.13 * i / len(images), 0.85 + 0.13 * (i + 1) / len(images))
        rep.update(0.0, f"scoring on {image.name}")
        base = predictor.masks(run.base, image, list(range(run.n_old)))
        variants = {"extended": predictor.masks(model, image, everything)}
        if naive is not None:
            variants["naive"] = predictor.masks(naive, image, everything)
        warm = {"warmup": run.warmup_masks[image.name]} if image.name in run.warmup_masks else None
        scores = score_image(image, run.manifest.class_keys, new_keys, base, variants, warm)
        (heldout if kind == "heldout" else kept).append(scores)
        if kind == "retention":
            summary[image.name] = summarise_retention(scores, list(variants))
    _stage_time(run, "evaluation", t0)
    return heldout, kept, summary


_EXTENSION_SUFFIX = re.compile(r"[+.]ext\.\d+$")


def extended_version(parent_version: str, extensions: int) -> str:
    """The version of a model made by the `extensions`-th extension in its lineage.

    Rule: the parent's release version plus a local label `ext.N` (PEP 440 / SemVer build
    metadata), N counting the extensions since that release: 0.1.0 -> 0.1.0+ext.1, and extending
    that -> 0.1.0+ext.2. A version with another local label keeps it: 1.0+cu -> 1.0+cu.ext.1.

    Args:
        parent_version: the base model's version.
        extensions: the number of extensions in the new model's lineage (1 for a first extension).
    """
    release = _EXTENSION_SUFFIX.sub("", str(parent_version))
    return f"{release}{'.' if '+' in release else '+'}ext.{extensions}"


def _lineage(run: _Run, new: list[ClassInfo], data: ExtensionData, settings: dict[str, Any],
             sha: str, inits: list[str]) -> dict[str, Any]:
    parent = run.manifest
    entry = {"parent": {"name": parent.name, "version": parent.version, "weights_sha256": sha,
                        "integrity_sha256": parent.integrity_sha256, "classes": len(parent.classes)},
             "classes_added": [c.key for c in new],
             "init": {c.key: (f"similar:{s.key}" if i == "similar" else "fresh") for c, i, s in
                      zip(new, inits, run.similar)},
             "data": {"description": data.description, "split": data.split,
                      "train_cases": [c.source or c.case_id for c in data.train],
                      "heldout_cases": [c.source or c.case_id for c in data.heldout]},
             "settings": settings,
             "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
             "software": f"UniversalSeg {__version__}"}
    provenance = dict(parent.provenance)
    provenance["extended_from"] = entry["parent"]
    provenance["lineage"] = [*parent.provenance.get("lineage", []), entry]
    return provenance


def extend_model(base: str | Path | LoadedModel, new_classes: Sequence[ClassSpec], data: Any, output_name: str | Path,
                 *, train: str = "heads+decoder", warmup_heads_steps: int = 100, steps: int | None = None,
                 epochs: float | None = None, time_budget_s: float | None = None, lr: float = 1e-4,
                 head_lr: float = 1e-3, init: str = "auto", holdout_fraction: float = 0.3, batch_size: int = 2,
                 patch_size: Sequence[int] | None = None, pool_size: int = 16, old_classes_per_step: int | None = 8,
                 loss_voxels: int | None = 32768,
                 naive_baseline: bool = True, retention_images: Sequence[str | Path] = ("sample",),
                 eval_overlap: float = 0.25, device: str | torch.device | None = "cpu", seed: int = 0,
                 overwrite: bool = False, text_encoder=None, progress: ProgressFn | None = None,
                 on_step: StepFn | None = None, cancel: Cancel = None) -> ExtensionReport:
    """Add `new_classes` to `base` using only `data`; write the result as a new model `output_name`.

    Args:
        base: model name, folder or LoadedModel (never modified).
        new_classes: ClassInfo, dict (key, name, prompt, group, parents, colour, synonyms, location) or key;
            each stores a location (`registry.location.new_class_location`).
        data: spec file, folder or list of (image, {class_key: mask}) pairs (see `continual.data`).
        output_name: the new model's name or folder.
        train: which weights learn: "heads" | "heads+decoder" | "all".
        steps, epochs, time_budget_s: length: `steps` or `epochs` (main-phase optimiser steps) and/or
            `time_budget_s` (training seconds, warm-up included); training stops at whichever ends
            first (default 60 steps).
        init: "auto" (measure similar vs fresh), "similar" or "fresh" head initialisation.
        loss_voxels: the head loss is estimated on this many random voxels per patch (None: all).
        progress, on_step: progress(fraction, message) and on_step(step, loss) report.
        cancel: an Event or callable; when set the run stops and nothing is written.
        The other keywords tune the optimiser, sampling and the retention check (see docs/continual.md).

    Returns the ExtensionReport (its model_path is the new model's folder).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    reporter = Reporter(progress, on_step, cancel)
    if init not in INIT_MODES:
        raise InputError(f"unknown init {init!r}; use one of {', '.join(INIT_MODES)}")
    out_dir = output_directory(output_name)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists; choose another name or pass overwrite")
    reporter.update(0.0, "loading the base model")
    loaded = base if isinstance(base, LoadedModel) else load_model(base)
    weights = loaded.path / loaded.manifest.weights_file
    if out_dir.resolve() == loaded.path.resolve():
        raise InputError("the new model must not replace the base model; choose another name")
    sha_before = sha256_file(weights)
    check_mode(train, loaded.model, loaded.manifest.backbone)
    new = make_new_classes(new_classes, loaded.manifest)
    emb = embed_new_classes(new, loaded.manifest, loaded.model.class_embeddings.shape[1], text_encoder)
    registry = _extended_registry(loaded.manifest, new)
    dev = resolve_device(device)
    plan = TrainPlan(mode=train, warmup_steps=warmup_heads_steps, lr=lr, head_lr=head_lr, batch_size=batch_size,
                     patch_size=_patch_size(patch_size, loaded.manifest, loaded.model.patch_multiple),
                     pool_size=pool_size, old_classes_per_step=old_classes_per_step, loss_voxels=loss_voxels,
                     time_budget_s=time_budget_s, seed=seed)
    reporter.update(0.02, "reading and preprocessing the new data")
    t0 = time.perf_counter()
    ext = load_extension_data(data, [c.key for c in new], loaded.manifest, registry, holdout_fraction)
    torch.manual_seed(seed)
    run = _Run(loaded, new, emb, plan, dev, reporter)
    _stage_time(run, "data", t0)
    plan.steps = _resolve_steps(steps, epochs, time_budget_s, ext, plan)

    t_train = time.perf_counter()
    warm_budget = None if time_budget_s is None else 0.25 * time_budget_s
    model, inits, warm_done, pool = _warm_up(run, ext, init, warmup_heads_steps, warm_budget)
    if train != "heads" and ext.heldout:
        _score_warmup(run, model, ext, eval_overlap)
    spent = time.perf_counter() - t_train - run.scoring_wall
    left = None if time_budget_s is None else max(1.0, time_budget_s - spent)
    naive, done, pseudo_stats = _main_phase(run, model, ext, pool, plan.steps, left,
                                            naive_baseline and train != "heads")
    extension_s = time.perf_counter() - t_start - run.scoring_wall
    extension_cpu = time.process_time() - cpu_start - run.scoring_cpu
    if naive_baseline and train == "heads":
        run.notes.append("naive baseline skipped: with train='heads' the old classes are bit-identical either way")
    heldout, kept, summary = _evaluate(run, model, naive, ext, list(retention_images), registry, eval_overlap)

    reporter.stage(0.98, 1.0)
    reporter.update(0.0, "writing the new model")
    sha_after = sha256_file(weights)
    if sha_after != sha_before:
        raise ModelFileError(f"the base model file {weights} changed during the extension; nothing was written")
    settings = {"train": train, "init": init, "steps": plan.steps if time_budget_s is None else None,
                "steps_done": done, "warmup_steps": warmup_heads_steps, "warmup_steps_done": warm_done,
                "time_budget_s": time_budget_s, "lr": lr, "head_lr": head_lr, "batch_size": batch_size,
                "patch_size": list(plan.patch_size), "pool_size": pool_size,
                "old_classes_per_step": old_classes_per_step, "loss_voxels": loss_voxels,
                "holdout_fraction": holdout_fraction,
                "device": str(dev), "seed": seed, "pseudo_labels": train != "heads"}
    manifest = copy.deepcopy(loaded.manifest)
    manifest.name = Path(out_dir).name
    manifest.classes = [*manifest.classes, *new]
    manifest.description = (f"{loaded.manifest.name} extended with {', '.join(c.key for c in new)}. "
                            + loaded.manifest.description).strip()
    manifest.provenance = _lineage(run, new, ext, settings, sha_before, inits)
    manifest.version = extended_version(loaded.manifest.version, len(manifest.provenance["lineage"]))
    reporter.check()  # last chance to cancel: after this the model exists
    path = save_model(model.cpu().eval(), manifest, out_dir, overwrite=overwrite,
                      weights_dtype=getattr(loaded.manifest, "weights_dtype", "float32"))
    run.timing["extension"] = round(extension_s, 2)  # loading, data, warm-up, pseudo-labels, training
    run.timing["extension_cpu"] = round(extension_cpu, 2)  # CPU seconds of all threads: robust to a busy machine
    run.timing["total"] = round(time.perf_counter() - t_start, 2)
    per_class = PerClassLPG.params_per_class(emb.shape[1], loaded.manifest.lpg_hidden) \
        if isinstance(model.lpg, PerClassLPG) else 0
    report = ExtensionReport(
        model_name=manifest.name, model_path=str(path),
        parent={"name": loaded.manifest.name, "path": str(loaded.path), "weights_sha256_before": sha_before,
                "weights_sha256_after": sha_after},
        new_classes=[{"key": c.key, "name": c.name, "group": c.group, "prompt": c.prompt, "parents": c.parents,
                      "location": c.location, "init": i, "similar_to": s.key, "similarity": round(s.cosine, 4)}
                     for c, i, s in zip(new, inits, run.similar)],
        init_selection=run.init_selection, settings={**settings, "pseudo_label_cache": pseudo_stats},
        data={"description": ext.description, "split": ext.split,
              "train_cases": [c.source for c in ext.train], "heldout_cases": [c.source for c in ext.heldout]},
        timing_s=run.timing,
        parameters={"per_class": per_class, "embedding_per_class": int(emb.shape[1]), "total": per_class * len(new)},
        heldout=heldout, retention=kept, retention_summary=summary,
        naive_baseline=naive is not None, notes=run.notes)
    reporter.update(1.0, f"done: {path}")
    return report
