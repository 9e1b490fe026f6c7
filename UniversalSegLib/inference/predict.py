"""`predict`: from a CT (file, DICOM folder or SimpleITK image) to per-class masks on its exact grid.

image -> check -> preprocess (RAS, spacing, HU window, body crop) -> sliding window (backbone
once per window, heads of the needed classes only; finished x-slabs of the model grid leave as the
windows go on) -> per class, slab by slab: model grid -> input grid -> threshold -> post-processing
rules -> `SegmentationResult`. Nothing is written to disk.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from UniversalSegLib.errors import ClassNotInModelError, InputError, UnknownClassError
from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.inference.plausibility import check as check_plausibility
from UniversalSegLib.inference.plausibility import without_limbs
from UniversalSegLib.inference.postprocess import apply_rules, disjoint, disjoint_keys, mean_within, outside_vessel_keys
from UniversalSegLib.inference.preprocess import preprocess
from UniversalSegLib.inference.restore import SlabRestorer
from UniversalSegLib.inference.result import ClassResult, SegmentationResult
from UniversalSegLib.inference.roi import subset_probability_slabs
from UniversalSegLib.inference.sliding_window import cpu_has_native_bf16
from UniversalSegLib.registry import ClassInfo, Registry
from UniversalSegLib.runtime import return_large_blocks
from UniversalSegLib.store import DEFAULT_MODEL, LoadedModel, Manifest, load_model

ProgressFn = Callable[[float, str], None]
FAST_OVERLAP = 0.25
# Shares of the progress bar per stage (sliding window dominates).
_READ, _PREP, _WINDOWS, _POST = 0.02, 0.06, 0.92, 0.99


class _Progress:
    """Forwards (fraction, message) to the user's callback, never going backwards."""

    def __init__(self, callback: ProgressFn | None):
        self.callback, self.last = callback, 0.0

    def __call__(self, fraction: float, message: str) -> None:
        self.last = max(self.last, min(1.0, fraction))
        if self.callback:
            self.callback(self.last, message)

    def span(self, start: float, end: float) -> ProgressFn:
        return lambda f, m: self(start + (end - start) * f, m)


def _both(a: BoxMask, b: BoxMask) -> BoxMask:
    """The voxels in both masks."""
    if not a or not b:
        return BoxMask.empty(a.shape)
    return BoxMask(a.shape, a.start, a.crop() & b.region(a.start, a.stop))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" picks CUDA when available; asking for an absent CUDA is a user error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    return dev


def load_for_inference(model: str | os.PathLike | LoadedModel | None,
                       device: str | torch.device = "auto") -> LoadedModel:
    """Load a model once for many `predict` calls, prepared as `predict` prepares the models it loads.

    Args:
        model: a model name or folder (default: the bundled model), or a `LoadedModel` (moved to `device`).
        device: "auto", "cpu", "cuda" or "cuda:N".
    """
    return _load(model, resolve_device(device))


def _load(model: str | os.PathLike | LoadedModel | None, device: torch.device) -> LoadedModel:
    if isinstance(model, LoadedModel):  # the caller's: used as it is (they may train or save it later)
        model.model.to(device).eval()
        return model
    loaded = load_model(model or DEFAULT_MODEL, device=device)
    if hasattr(loaded.model.lpg, "fold_text"):  # ours alone: fold the constant text terms (less memory)
        loaded.model.lpg.fold_text(loaded.model.class_embeddings)
    if device.type == "cpu":
        # oneDNN convolves channels-last 3D tensors without reordering them to its blocked layout: the
        # backbone runs ~1.3x faster (docs/performance.md). Only for models loaded here: a caller's
        # model keeps its contiguous weights (safetensors saves only contiguous tensors).
        loaded.model.to(memory_format=torch.channels_last_3d)
    return loaded


def _read(image: str | os.PathLike | sitk.Image, allow_non_ct: bool, series_uid: str | None = None) -> sitk.Image:
    from UniversalSegLib.io import check_image, read_image

    if isinstance(image, sitk.Image):
        if series_uid:
            raise InputError("series_uid selects a series of a DICOM folder; the image is already read")
        check_image(image, allow_non_ct=allow_non_ct)
        return image
    return read_image(Path(image), allow_non_ct=allow_non_ct, series_uid=series_uid)


def needed_classes(manifest: Manifest,
                   requested: str | Sequence[str] | None) -> tuple[list[ClassInfo], list[ClassInfo]]:
    """(requested classes, classes to compute): the request plus pair partners, parents and (for a
    vessel or an organ) the vessels that the rules need, so a class comes out the same however it
    was picked.

    Names are keys, display names or synonyms (one string is one name); unknown names raise
    UnknownClassError with suggestions, and known classes the model lacks ClassNotInModelError.
    """
    registry = manifest.registry()
    if isinstance(requested, str):
        requested = [requested]  # "liver" is one class, not five letters
    wanted = list(registry) if requested is None else [_resolve_in_model(manifest, registry, n) for n in requested]
    wanted = list({c.key: c for c in wanted}.values())
    if not wanted:
        raise InputError("no classes requested")
    keys = {c.key for c in wanted}
    separated = disjoint_keys(list(registry))
    checked = set(separated) | set(outside_vessel_keys(list(registry)))
    todo = list(wanted)
    while todo:
        info = todo.pop()
        extra = [info.pair] if info.postprocess == "split_pair" and info.pair else []
        extra += info.parents if info.postprocess == "within_parents" else []
        extra += separated if info.key in checked else []
        for key in extra:
            if key in registry and key not in keys:
                keys.add(key)
                todo.append(registry[key])
    return wanted, [c for c in registry if c.key in keys]  # model order


def _resolve_in_model(manifest: Manifest, registry: Registry, name: str) -> ClassInfo:
    """The model's class called `name`; a class known elsewhere (registry, other models) names its models."""
    from UniversalSegLib.registry import default_registry
    from UniversalSegLib.store import list_models

    try:
        return registry.resolve(name)
    except UnknownClassError:
        installed = list_models()
        for other in [default_registry(), *(m.registry() for _, m in installed)]:
            try:
                known = other.resolve(name)
            except UnknownClassError:
                continue
            holders = sorted({m.name for _, m in installed if known.key in m.class_keys})
            where = ", ".join(holders) or "none installed; `universalseg extend` teaches a model new classes"
            raise ClassNotInModelError(f"class {name!r} ({known.key}) is not in model {manifest.name} "
                                       f"(models that have it: {where})") from None
        raise


def _cut_off_warning(results: Sequence[ClassResult], reference: sitk.Image) -> None:
    """On a thin scan, name the structures that reach its first or last slice (they go on beyond it)."""
    from UniversalSegLib.io.geometry import mask_parts
    from UniversalSegLib.io.image import ThinScanWarning, thin_axis

    thin = thin_axis(reference)
    if thin is None:
        return
    axis = 2 - "xyz".index(thin[0])  # masks are (z, y, x)
    cut = [c.info.key for c in results
           if (box := mask_parts(c)[0][axis]).stop > box.start and (box.start == 0 or box.stop == thin[1])]
    if cut:
        verb = "reaches" if len(cut) == 1 else "reach"
        warnings.warn(f"the scan has only {thin[1]} slices along {thin[0]}: {', '.join(cut)} {verb} its first or "
                      "last slice, probably cut off (statistics: touches_border)", ThinScanWarning, stacklevel=3)


def predict(image: str | os.PathLike | sitk.Image, model: str | os.PathLike | LoadedModel | None = None,
            classes: str | Sequence[str] | None = None, device: str | torch.device = "auto", fast: bool = False,
            progress: ProgressFn | None = None, keep_probabilities: bool = False, allow_non_ct: bool = False,
            *, postprocess: bool = True, include_helper_classes: bool = False, sw_batch_size: int | None = None,
            class_chunk: int | None = None, cache_features: bool | None = None,
            series_uid: str | None = None, plausibility: bool = True,
            subset_windows: bool = True) -> SegmentationResult:
    """Segment `image` and return every requested class as its own mask on the input's exact grid.

    image: a NIfTI/NRRD/MHA file, a DICOM series folder, or a SimpleITK image in HU.
    model: a model name, folder, or `LoadedModel` (default: the bundled model).
    classes: names, keys or synonyms, or one such string (default: all the model's classes). Parents and pair
        partners the post-processing needs are computed too, and returned only with
        `include_helper_classes`.
    device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N". Mixed precision on CUDA.
    fast: window overlap 0.25 instead of the manifest's (about 2-3x fewer windows in 3D), on CUDA
        twice the window batch, and on CPUs with native bfloat16 (AVX512-BF16/AMX) a bfloat16
        backbone (about 2x faster); expect slightly rougher borders. Without `fast`, CPU runs are
        float32 throughout and CUDA runs use float16 mixed precision.
    progress: called as progress(fraction, message) with fractions rising to 1.0.
    keep_probabilities: also return each class's probability (uint8 0..255) on the input grid.
    allow_non_ct: segment an image that does not look like CT (a warning instead of an error).
    sw_batch_size: windows per forward pass (default 1 on CPU, 4 on CUDA).
    class_chunk: classes stitched at once (memory: class_chunk x one patch of model-grid rows x 2 bytes;
        None: as many as a share of the free memory holds, so the backbone usually runs once per window).
    cache_features: keep the windows' backbone features between class chunks (None: only when cheap;
        see `sliding_window`); True is faster for many classes on CPU, at some memory.
    postprocess: apply the registry's rules (largest component, left/right split, within parents).
    plausibility: then check where each mask lies (`inference/plausibility.py`): components in an
        arm are removed, masks in an implausible position flagged; the reason is in `ClassResult.reason`.
    subset_windows: for a subset of classes, run windows only around where the requested classes (and their
        pair partners) are, found by a coarse half-resolution pass (`inference/roi.py`); masks then differ
        slightly from a full run's. False: the full grid, masks as in a run of all classes.
    series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to segment (default:
        the CT series with the most slices, named in a `DicomSeriesWarning`).
    """
    return_large_blocks()  # fixed 32 MB mmap threshold; lower ones save memory but cost time (runtime.py)
    report = _Progress(progress)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report(0.0, "reading image")
    reference = _read(image, allow_non_ct, series_uid)
    dev = resolve_device(device)
    loaded = _load(model, dev)
    manifest, net = loaded.manifest, loaded.model
    wanted, computed = needed_classes(manifest, classes)
    timings["read_and_load_s"] = time.perf_counter() - t0

    report(_READ, "preprocessing")
    t = time.perf_counter()
    pre = manifest.preprocessing
    prepared = preprocess(reference, pre)
    timings["preprocess_s"] = time.perf_counter() - t

    t = time.perf_counter()
    overlap = min(pre.overlap, FAST_OVERLAP) if fast else pre.overlap
    batch = sw_batch_size or ((8 if fast else 4) if dev.type == "cuda" else 1)
    amp = dev.type == "cuda" or (fast and dev.type == "cpu" and cpu_has_native_bf16())
    index = {k: i for i, k in enumerate(manifest.class_keys)}
    computed_keys = {c.key for c in computed}
    masks: dict[str, BoxMask] = {}
    confidence: dict[str, float] = {}
    probabilities: dict[str, np.ndarray | None] = {}
    values: dict[str, np.ndarray] = {}  # voxel probabilities of classes whose later rules change the mask
    windows = report.span(_PREP, _WINDOWS)
    restorers: dict[int, SlabRestorer] = {}
    separated = set(disjoint_keys(computed)) if postprocess else set()
    outside = set(outside_vessel_keys(computed)) if separated else set()
    # With the plausibility check, components in an arm go before a rule picks the largest one: the
    # bundled model's 221 ml "aorta" in an arm otherwise wins over the real aorta (issue 25).
    deferred = postprocess and plausibility
    early_largest: set[str] = set()  # classes whose largest component is then taken after the arms go
    roi_classes = None  # a subset's requested classes and their pair partners bound the windows
    if subset_windows and classes is not None and len(wanted) < len(manifest.class_keys):
        one = {c.key: c.postprocess in ("largest_component", "split_pair") for c in computed}
        roi_classes = {index[k]: one[k] for c in wanted for k in (c.key, c.pair) if k in computed_keys}
    window_info: dict = {}
    with torch.inference_mode():
        for slab in subset_probability_slabs(net, prepared.volume, [index[c.key] for c in computed], pre.patch_size,
                                             overlap, dev, roi_classes=roi_classes, sw_batch_size=batch,
                                             class_chunk=class_chunk, amp=amp, cache_features=cache_features,
                                             progress=windows, info=window_info):
            info = computed[slab.position]
            if slab.position not in restorers:
                # A single organ's rule needs nothing else: apply it as soon as the class is complete.
                largest = postprocess and (info.postprocess == "largest_component" or (
                    info.postprocess == "split_pair" and info.pair not in computed_keys))
                if largest and deferred:
                    early_largest.add(info.key)
                    largest = False
                later = postprocess and (info.key in separated or info.key in early_largest or (
                    info.postprocess in ("split_pair", "within_parents") and not largest))
                restorers[slab.position] = SlabRestorer(prepared.grid, reference, pre.threshold, keep_probabilities,
                                                        largest_only=largest, keep_values=later)
            restorers[slab.position].add(slab.start, slab.values, slab.last)
            if slab.last:
                restored = restorers.pop(slab.position).finish()
                masks[info.key], confidence[info.key] = restored.mask, restored.mean_confidence
                probabilities[info.key] = restored.probability
                if restored.values is not None:
                    values[info.key] = restored.values
                report(report.last, f"resampled {info.key}")
            del slab  # its rows are on the input grid now; not alive while the next windows run
    timings["inference_s"] = time.perf_counter() - t

    report(_WINDOWS, "post-processing")
    t = time.perf_counter()
    reasons: dict[str, str] = {}
    if values:
        infos = {c.key: c for c in computed}
        if deferred:  # as the restorer would, but without the arms' components: then the same rules
            pruned, reasons = without_limbs(masks, infos, reference)
            pruned = apply_rules(pruned, {k: infos[k] for k in early_largest}, reference, pre.spacing,
                                 rules=("split_pair", "largest_component"))
            confidence.update({k: mean_within(pruned[k], [(masks[k], values[k])]) for k in early_largest})
        resolved = disjoint(masks, values, [k for k in infos if k in separated],
                            {k: confidence[k] for k in infos if k in outside})
        if deferred:
            resolved = {k: _both(m, pruned[k]) if k in early_largest or k in reasons else m
                        for k, m in resolved.items()}
        for key in outside:  # no voxel values: an organ keeps its mean unless it is gone
            confidence[key] = confidence[key] if resolved[key] else 0.0
        final = apply_rules(resolved, infos, reference, pre.spacing, rules=("split_pair", "within_parents"))
        for key in (k for k in values if final[k] is not masks[k]):
            # a side may have received voxels its pair predicted: read them there
            sources = [(masks[k], values[k]) for k in (key, infos[key].pair) if k in values]
            confidence[key] = mean_within(final[key], sources)
        masks = final
    if deferred:
        checked = check_plausibility(masks, confidence, {c.key: c for c in computed}, reference)
        masks, confidence = checked.masks, checked.confidence
        reasons = {k: "; ".join(r for r in (reasons.get(k), checked.reasons.get(k)) if r)
                   for k in set(reasons) | set(checked.reasons)}
    timings["postprocess_s"] = time.perf_counter() - t

    shown = computed if include_helper_classes else wanted
    results = [ClassResult(c, masks[c.key], confidence[c.key], probabilities[c.key], reasons.get(c.key, ""))
               for c in shown]
    _cut_off_warning(results, reference)
    metadata = {
        "model_path": str(loaded.path), "model_version": manifest.version, "device": str(dev), "fast": fast,
        "overlap": overlap, "sw_batch_size": batch, "mixed_precision": amp,
        "computed_classes": [c.key for c in computed],
        "model_grid_size": list(prepared.grid.size), "model_spacing": list(pre.spacing),
        "postprocessed": postprocess, "plausibility_checked": postprocess and plausibility, **window_info, **timings,
        "total_s": time.perf_counter() - t0,
    }
    report(_POST, "done")
    report(1.0, "done")
    return SegmentationResult(reference, results, manifest.name, metadata)
