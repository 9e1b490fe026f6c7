"""`predict`: from a CT (file, DICOM folder or SimpleITK image) to per-class masks on its exact grid.

image -> check -> preprocess (RAS, spacing, HU window, body crop) -> sliding window (backbone
once per window, heads of the needed classes only; finished x-slabs of the model grid leave as the
windows go on) -> per class, slab by slab: model grid -> input grid -> threshold -> post-processing
rules (`rules.py`) -> `SegmentationResult`. Nothing is written to disk.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from UniversalSegLib.device import resolve_device
from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.inference.plausibility import Trunk, blank_limbs
from UniversalSegLib.inference.preprocess import preprocess
from UniversalSegLib.inference.request import (  # noqa: F401 - needed_classes: also imported from here
    PredictRequest,
    PredictSettings,
    needed_classes,
    prepare_model,
    resolve_request,
)
from UniversalSegLib.inference.restore import SlabRestorer
from UniversalSegLib.inference.result import ClassResult, SegmentationResult
from UniversalSegLib.inference.roi import subset_probability_slabs
from UniversalSegLib.inference.rules import Postprocessing
from UniversalSegLib.inference.sliding_window import cpu_has_native_bf16
from UniversalSegLib.progress import Monotonic, ProgressFn
from UniversalSegLib.store import LoadedModel

FAST_OVERLAP = 0.25
# Shares of the progress bar per stage (sliding window dominates).
_READ, _PREP, _WINDOWS, _POST = 0.02, 0.06, 0.92, 0.99


def load_for_inference(model: str | os.PathLike | LoadedModel | None,
                       device: str | torch.device = "auto") -> LoadedModel:
    """Load a model once for many `predict` calls, prepared as `predict` prepares the models it loads.

    Args:
        model: a model name or folder (default: the bundled model), or a `LoadedModel` (moved to `device`).
        device: "auto", "cpu", "cuda" or "cuda:N".
    """
    return prepare_model(model, resolve_device(device))


def _cut_off_warning(results: Sequence[ClassResult], reference: sitk.Image) -> None:
    """On a thin scan, name the structures that reach its first or last slice (they go on beyond it)."""
    from UniversalSegLib.geometry import mask_parts
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


def predict(image: str | os.PathLike | sitk.Image | PredictRequest,
            model: str | os.PathLike | LoadedModel | None = None, classes: str | Sequence[str] | None = None,
            device: str | torch.device = "auto", fast: bool = False,
            progress: ProgressFn | None = None, keep_probabilities: bool = False, allow_non_ct: bool = False,
            *, postprocess: bool = True, include_helper_classes: bool = False, sw_batch_size: int | None = None,
            class_chunk: int | None = None, cache_features: bool | None = None,
            series_uid: str | None = None, plausibility: bool = True,
            subset_windows: bool = True) -> SegmentationResult:
    """Segment `image` and return every requested class as its own mask on the input's exact grid.

    Args:
        image: a NIfTI/NRRD/MHA file, a DICOM series folder, or a SimpleITK image in HU; or a
            `PredictRequest` (`resolve_request`: checked, model loaded), whose settings then apply:
            only `progress` may be given beside it.
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
        plausibility: arms beside the trunk are blanked to air in the model's input (when no computed
            class may lie in a limb), and each mask's position is checked (`inference/plausibility.py`):
            components in an arm are removed, masks in an implausible position flagged; the reason is in
            `ClassResult.reason`.
        subset_windows: for a subset of classes, run windows only around where the requested classes (and their
            pair partners) are, found by a coarse half-resolution pass (`inference/roi.py`); masks then differ
            slightly from a full run's. False: the full grid, masks as in a run of all classes.
        series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to segment (default:
            the CT series with the most slices, named in a `DicomSeriesWarning`).
    """
    report = Monotonic(progress)
    report(0.0, "reading image")
    if isinstance(image, PredictRequest):
        _only_progress_beside_a_request(locals())
        request = image
    else:
        settings = PredictSettings(fast, keep_probabilities, postprocess, plausibility, include_helper_classes,
                                   sw_batch_size, class_chunk, cache_features, subset_windows)
        request = resolve_request(image, model, classes, device, allow_non_ct=allow_non_ct, series_uid=series_uid,
                                  settings=settings)
    return _run(request, report)


def _only_progress_beside_a_request(arguments: dict) -> None:
    """A request carries its settings: `predict(request, progress=...)` takes nothing else."""
    defaults = {name: p.default for name, p in inspect.signature(predict).parameters.items()}
    given = [name for name in defaults if name not in ("image", "progress") and arguments[name] != defaults[name]]
    if given:
        raise TypeError(f"predict(request) takes its settings from the request; also given: {', '.join(given)}")


def _run(request: PredictRequest, report: Monotonic) -> SegmentationResult:
    """`predict` for a resolved request."""
    t0 = time.perf_counter()
    reference, loaded, dev, settings = request.image, request.model, request.device, request.settings
    fast, postprocess, plausibility = settings.fast, settings.postprocess, settings.plausibility
    manifest, net = loaded.manifest, loaded.model
    wanted, computed = list(request.wanted), list(request.computed)
    timings = {"read_and_load_s": request.resolve_s}  # the checks and the model loading (resolve_request)

    report(_READ, "preprocessing")
    t = time.perf_counter()
    pre = manifest.preprocessing
    # The model does not see arms beside the trunk: they move its output elsewhere (context, body
    # crop). Only its input: masks and HU statistics keep `reference` (plausibility.blank_limbs).
    # The limb finder's result on `reference` serves the blanking and the plausibility rules alike.
    trunk = Trunk(reference)  # found on first use: never when neither needs it
    seen, blanked_ml = blank_limbs(reference, computed, trunk) if plausibility else (reference, 0.0)
    prepared = preprocess(seen, pre)
    del seen
    timings["preprocess_s"] = time.perf_counter() - t

    t = time.perf_counter()
    overlap = min(pre.overlap, FAST_OVERLAP) if fast else pre.overlap
    batch = settings.sw_batch_size or ((8 if fast else 4) if dev.type == "cuda" else 1)
    amp = dev.type == "cuda" or (fast and dev.type == "cpu" and cpu_has_native_bf16())
    index = {k: i for i, k in enumerate(manifest.class_keys)}
    masks: dict[str, BoxMask] = {}
    confidence: dict[str, float] = {}
    probabilities: dict[str, np.ndarray | None] = {}
    values: dict[str, np.ndarray] = {}  # voxel probabilities of classes whose later rules read them
    windows = report.span(_PREP, _WINDOWS)
    restorers: dict[int, SlabRestorer] = {}
    rules = Postprocessing(computed, postprocess, plausibility)
    roi_classes = None  # a subset's requested classes and their pair partners bound the windows
    if settings.subset_windows and len(wanted) < len(manifest.class_keys):
        computed_keys = {c.key for c in computed}
        one = {c.key: c.postprocess in ("largest_component", "split_pair") for c in computed}
        roi_classes = {index[k]: one[k] for c in wanted for k in (c.key, c.pair) if k in computed_keys}
    window_info: dict = {}
    with torch.inference_mode():
        for slab in subset_probability_slabs(net, prepared.volume, [index[c.key] for c in computed], pre.patch_size,
                                             overlap, dev, roi_classes=roi_classes, sw_batch_size=batch,
                                             class_chunk=settings.class_chunk, amp=amp,
                                             cache_features=settings.cache_features, progress=windows,
                                             info=window_info):
            info = computed[slab.position]
            if slab.position not in restorers:
                how = rules.restoration(info)
                restorers[slab.position] = SlabRestorer(prepared.grid, reference, pre.threshold,
                                                        settings.keep_probabilities,
                                                        largest_only=how.largest_only, keep_values=how.keep_values)
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
    masks, confidence, reasons = rules.apply(reference, pre.spacing, masks, confidence, values, trunk)
    timings["postprocess_s"] = time.perf_counter() - t

    shown = computed if settings.include_helper_classes else wanted
    results = [ClassResult(c, masks[c.key], confidence[c.key], probabilities[c.key], reasons.get(c.key, ""))
               for c in shown]
    _cut_off_warning(results, reference)
    metadata = {
        "model_path": str(loaded.path), "model_version": manifest.version, "device": str(dev), "fast": fast,
        "overlap": overlap, "sw_batch_size": batch, "mixed_precision": amp,
        "computed_classes": [c.key for c in computed],
        "model_grid_size": list(prepared.grid.size), "model_spacing": list(pre.spacing),
        "postprocessed": postprocess, "plausibility_checked": postprocess and plausibility, **window_info,
        **timings,
        "total_s": time.perf_counter() - t0 + request.resolve_s,
    }
    if blanked_ml:  # named only when it happened: a scan without arms keeps its metadata
        metadata["limbs_blanked_ml"] = round(blanked_ml, 1)
    report(_POST, "done")
    report(1.0, "done")
    return SegmentationResult(reference, results, manifest.name, metadata)
