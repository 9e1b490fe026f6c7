"""Image input (NIfTI, NRRD, MHA/MHD, DICOM series: see dicom_input.py) with plausibility checks, and every
output writer.

All writers take a `SegmentationResult` and write atomically (temporary file, then rename: `io.atomic`).
Names are imported lazily, so `UniversalSegLib.io.atomic` stays light for the store, training and
cache workers that use it.
"""

from UniversalSegLib._lazy import lazy_getattr

_LAZY = {
    "atomic_dir": "UniversalSegLib.io.atomic",
    "atomic_write": "UniversalSegLib.io.atomic",
    "DicomSeriesWarning": "UniversalSegLib.io.dicom_input",
    "write_dicom_seg": "UniversalSegLib.io.dicomseg",
    "NonCTWarning": "UniversalSegLib.io.image",
    "check_image": "UniversalSegLib.io.image",
    "dicom_source_files": "UniversalSegLib.io.image",
    "read_image": "UniversalSegLib.io.image",
    "merge_label_map": "UniversalSegLib.io.nifti",
    "write_class_masks": "UniversalSegLib.io.nifti",
    "write_label_map": "UniversalSegLib.io.nifti",
    "write_preview": "UniversalSegLib.io.preview",
    "write_seg_nrrd": "UniversalSegLib.io.segnrrd",
    "compute_statistics": "UniversalSegLib.io.stats",
    "write_statistics": "UniversalSegLib.io.stats",
    "DEFAULT_FORMATS": "UniversalSegLib.io.writers",
    "FORMATS": "UniversalSegLib.io.writers",
    "parse_formats": "UniversalSegLib.io.writers",
    "write_outputs": "UniversalSegLib.io.writers",
}

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = sorted(_LAZY)
