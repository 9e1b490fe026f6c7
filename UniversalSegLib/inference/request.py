"""One resolved prediction request: every check `predict` needs, done once, before the model runs.

`resolve_request` reads and checks the input (a DICOM folder is scanned once: the series' headers
travel with the request to the DICOM SEG checks and writer), checks the output folder and the
formats, resolves the device, loads the model (integrity record, weights hash) and resolves the
class names with the helpers the post-processing rules need. `predict` accepts the request and
runs the model; `predict(ct, classes=...)` builds one itself, so the CLI and the Python API check
alike and nothing is checked twice.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import torch

from UniversalSegLib.device import resolve_device
from UniversalSegLib.errors import ClassNotInModelError, InputError, UniversalSegWarning, UnknownClassError
from UniversalSegLib.inference.rules import helper_keys
from UniversalSegLib.io.image import ImageSource
from UniversalSegLib.registry import ClassInfo, Registry
from UniversalSegLib.store import DEFAULT_MODEL, LoadedModel, Manifest, find_model, load_model, read_manifest

DEFAULT_FORMATS = ("seg.nrrd", "nifti", "stats")  # written when no formats are asked for (plus dicom-seg for DICOM)


class DicomSegDroppedWarning(UniversalSegWarning):
    """dicom-seg, a default format for DICOM input, is impossible for this series and is not written."""


@dataclass(frozen=True)
class PredictSettings:
    """How `predict` runs (see `predict` for each)."""

    fast: bool = False
    keep_probabilities: bool = False
    postprocess: bool = True
    plausibility: bool = True
    include_helper_classes: bool = False
    sw_batch_size: int | None = None
    class_chunk: int | None = None
    cache_features: bool | None = None
    subset_windows: bool = True  # a class subset runs windows only around its classes (inference/roi.py)


@dataclass(frozen=True)
class PredictRequest:
    """A checked request: what `predict` segments, with which model, classes and device, and where the
    CLI writes it. Made by `resolve_request`."""

    source: ImageSource  # the checked image, and the DICOM series it came from
    model: LoadedModel  # loaded on `device`
    wanted: tuple[ClassInfo, ...]  # the requested classes
    computed: tuple[ClassInfo, ...]  # those and the classes the rules need, in model order
    device: torch.device
    settings: PredictSettings = PredictSettings()
    output: Path | None = None  # the folder to write into (checked writable, room enough), if any
    formats: tuple[str, ...] = ()  # formats to write there (dicom-seg checked against the source)
    resolve_s: float = field(default=0.0, compare=False)  # seconds the checks and the model loading took

    @property
    def image(self) -> sitk.Image:
        return self.source.image


def resolve_request(image: str | os.PathLike | sitk.Image, model: str | os.PathLike | LoadedModel | None = None,
                    classes: str | Sequence[str] | None = None, device: str | torch.device = "auto", *,
                    allow_non_ct: bool = False, series_uid: str | None = None,
                    output: str | os.PathLike | None = None, formats: str | Sequence[str] | None = None,
                    settings: PredictSettings = PredictSettings()) -> PredictRequest:
    """Check everything a prediction needs, in the order a user fixes it, and load the model.

    Args:
        image: a NIfTI/NRRD/MHA file, a DICOM series folder, or a SimpleITK image in HU.
        model: a model name, folder, or `LoadedModel` (default: the bundled model).
        classes: names, keys or synonyms, or one such string (default: all the model's classes).
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
        allow_non_ct: accept an image that does not look like CT (a `NonCTWarning` instead of an error).
        series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to segment.
        output: a folder the outputs will be written into: checked now (not a file, writable, room enough).
        formats: with `output`, the formats to write (comma-separated or a list; default `DEFAULT_FORMATS`,
            plus dicom-seg for a DICOM series that allows one, else a `DicomSegDroppedWarning`).
        settings: how `predict` runs.
    Raises InputError, ModelFileError or UnknownClassError (one line each) for anything that cannot work.
    """
    start = time.perf_counter()
    outdir = Path(output).expanduser() if output is not None else None
    if outdir is not None and outdir.exists() and not outdir.is_dir():
        raise InputError(f"output {outdir} exists and is not a folder")
    source = read_source(image, allow_non_ct, series_uid)
    chosen: tuple[str, ...] = ()
    if outdir is not None:
        from UniversalSegLib.io.destination import check_destination, output_size_bound

        check_destination(outdir, output_size_bound(source.image))
        chosen = tuple(resolve_formats(formats, source))
    elif formats is not None:
        raise InputError("formats are written into an output folder; give one")
    dev = resolve_device(device)
    folder = model.path if isinstance(model, LoadedModel) else find_model(model)
    manifest = model.manifest if isinstance(model, LoadedModel) else read_manifest(folder)
    wanted, computed = needed_classes(manifest, classes)  # names first: a typo costs no model loading
    loaded = prepare_model(model if isinstance(model, LoadedModel) else folder, dev)
    return PredictRequest(source, loaded, tuple(wanted), tuple(computed), dev, settings, outdir, chosen,
                          time.perf_counter() - start)


def read_source(image: str | os.PathLike | sitk.Image, allow_non_ct: bool = False,
                series_uid: str | None = None) -> ImageSource:
    """Read and check `image` (see `io.read_image_source`); an image already read is checked as it is."""
    from UniversalSegLib.io import check_image
    from UniversalSegLib.io.image import read_image_source

    if isinstance(image, sitk.Image):
        if series_uid:
            raise InputError("series_uid selects a series of a DICOM folder; the image is already read")
        check_image(image, allow_non_ct=allow_non_ct)
        return ImageSource(image)
    return read_image_source(Path(image), allow_non_ct=allow_non_ct, series_uid=series_uid)


def resolve_formats(asked: str | Sequence[str] | None, source: ImageSource) -> list[str]:
    """The formats to write; dicom-seg is checked against the source now, before the model runs.

    Asked for and impossible: refused. Only a default: dropped with a `DicomSegDroppedWarning`.
    """
    from UniversalSegLib.io import dicom_source_files, parse_formats
    from UniversalSegLib.io.writers import dicom_seg_refusal

    dicom = source.dicom or dicom_source_files(source.image)
    if asked is not None:
        formats = parse_formats(asked)
        refusal = dicom_seg_refusal(dicom) if "dicom-seg" in formats else None
        if refusal:
            raise InputError(refusal)
        return formats
    if not dicom:
        return list(DEFAULT_FORMATS)
    refusal = dicom_seg_refusal(dicom)
    if refusal:
        warnings.warn(f"{refusal}; writing {', '.join(DEFAULT_FORMATS)} without it", DicomSegDroppedWarning,
                      stacklevel=2)
        return list(DEFAULT_FORMATS)
    return [*DEFAULT_FORMATS, "dicom-seg"]


def prepare_model(model: str | os.PathLike | LoadedModel | None, device: torch.device) -> LoadedModel:
    """The model on `device`, prepared for inference; a `LoadedModel` is used as it is (moved, eval mode)."""
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


def needed_classes(manifest: Manifest,
                   requested: str | Sequence[str] | None) -> tuple[list[ClassInfo], list[ClassInfo]]:
    """(requested classes, classes to compute): the request plus the classes the post-processing
    rules declare they need (`rules.helper_keys`: pair partners, parents, and for a vessel or an
    organ the vessels), so a class comes out the same however it was picked.

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
    infos = list(registry)
    todo = list(wanted)
    while todo:
        for key in helper_keys(todo.pop(), infos):  # what the post-processing rules declare they need
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
