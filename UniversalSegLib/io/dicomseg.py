"""DICOM SEG output (binary, one segment per class, overlaps allowed) referencing the source CT series.

Only possible when the input was a DICOM series: a SEG must name the study, series, frame of
reference and instances it was derived from (`dicom_input.dicom_seg_problem` says what is lacking,
before any model runs). Frames are matched to the reference grid by each source slice's position,
so the SEG lines up with the scan whatever the file order; a slice the reader filled (no source
instance) gets no frame. An empty dataset SOP Class UID is taken from the file meta header.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from UniversalSegLib import __version__
from UniversalSegLib.errors import InputError
from UniversalSegLib.geometry import check_masks, grid_shape, mask_parts
from UniversalSegLib.inference.result import ClassResult, SegmentationResult
from UniversalSegLib.io.atomic import atomic_write
from UniversalSegLib.io.dicom_input import DicomStack, dicom_seg_problem, sop_class_uid, source_headers

ALGORITHM_NAME = "UniversalSeg"
_FALLBACK_CATEGORY = ("SCT", "123037004", "Anatomical Structure")
_FALLBACK_TYPE = ("SCT", "85756007", "Tissue")
_POSITION_TOLERANCE = 0.05  # fraction of a voxel a source slice may be off the reference grid

if TYPE_CHECKING:  # highdicom and pydicom take a second to import: only when a SEG is written
    import highdicom as hd
    import pydicom
    from highdicom.sr import CodedConcept


def _code(triplet: Sequence[str]) -> CodedConcept:
    from highdicom.sr import CodedConcept

    scheme, value, meaning = triplet
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _description(number: int, c: ClassResult,
                 algorithm: hd.AlgorithmIdentificationSequence) -> hd.seg.SegmentDescription:
    import highdicom as hd

    term = c.info.terminology
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=c.info.name[:64],
        segmented_property_category=_code(term.get("category") or _FALLBACK_CATEGORY),
        segmented_property_type=_code(term.get("type") or _FALLBACK_TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id=c.info.key,
        anatomic_regions=[_code(term["region"])] if term.get("region") else None,
        display_color=hd.color.CIELabColor.from_rgb(*c.info.color),
    )
    if term.get("modifier"):  # laterality lives inside the type code item
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(term["modifier"])]
    return description


def _sources_by_slice(reference: sitk.Image, source: Sequence[Path] | DicomStack) -> dict[int, pydicom.Dataset]:
    """Source datasets (headers only) by the reference's slice index k; checks each lies on the grid once.

    Grid slices without a source are allowed: a missing slice the reader filled by interpolation
    (io/dicom_input.py) has no instance to reference, so the SEG has no frame there.
    """
    by_slice: dict[int, pydicom.Dataset] = {}
    files, headers = source_headers(source)
    for f, ds in zip(files, headers):
        position = [float(v) for v in ds.ImagePositionPatient]
        i, j, k = reference.TransformPhysicalPointToContinuousIndex(position)
        if max(abs(i), abs(j), abs(k - round(k))) > _POSITION_TOLERANCE or not 0 <= round(k) < reference.GetSize()[2]:
            raise InputError(f"DICOM file {f} does not lie on the segmented image's grid; pass the series the "
                             "image was read from")
        if int(round(k)) in by_slice:
            raise InputError(f"the {len(files)} DICOM source files do not cover the image's slices once each "
                             f"({f} repeats slice {int(round(k))})")
        if not str(getattr(ds, "SOPClassUID", "") or "").strip():
            ds.SOPClassUID = sop_class_uid(ds)  # anonymisers often leave only the file meta's copy
        by_slice[int(round(k))] = ds
    return by_slice


def write_dicom_seg(result: SegmentationResult, path: str | os.PathLike,
                    source_files: Sequence[str | os.PathLike] | DicomStack,
                    series_number: int = 300) -> Path:
    """Write a binary DICOM SEG of every class of `result`, derived from the DICOM series `source_files`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    check_masks(result)
    problem = dicom_seg_problem(source_files)
    if problem:
        raise InputError(f"cannot write a DICOM SEG: {problem}")
    by_slice = _sources_by_slice(result.reference, source_files if isinstance(source_files, DicomStack)
                                 else [Path(f) for f in source_files])
    covered = sorted(by_slice)
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence,
                                                   version=f"{__version__} ({result.model_name})"[:64])
    descriptions = [_description(n, c, algorithm) for n, c in enumerate(result.classes, start=1)]
    # (frames=z, rows=y, columns=x, segments): the source slices are in the reference's k order
    pixels = np.zeros((*grid_shape(result.reference), len(result.classes)), dtype=np.uint8)
    for n, c in enumerate(result.classes):
        slices, crop = mask_parts(c)
        pixels[(*slices, n)] = crop
    seg = hd.seg.Segmentation(
        source_images=[by_slice[k] for k in covered],
        pixel_array=pixels if len(covered) == len(pixels) else pixels[covered],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="UniversalSeg",
        manufacturer_model_name=result.model_name[:64] or ALGORITHM_NAME,
        software_versions=__version__,
        device_serial_number="0",
        content_label="UNIVERSALSEG",
        content_description="UniversalSeg automatic segmentation",
        series_description=f"UniversalSeg {result.model_name}"[:64],
    )
    path = Path(path)
    with atomic_write(path) as tmp:
        seg.save_as(tmp)
    return path
