"""Image input (NIfTI, NRRD, MHA/MHD, DICOM series: see dicom_input.py) with plausibility checks, and every
output writer.

All writers take a `SegmentationResult` and write atomically (temporary file, then rename).
"""

from UniversalSegLib.io.atomic import atomic_dir, atomic_write
from UniversalSegLib.io.dicom_input import DicomSeriesWarning
from UniversalSegLib.io.dicomseg import write_dicom_seg
from UniversalSegLib.io.dicomseries import write_dicom_series
from UniversalSegLib.io.image import NonCTWarning, check_image, dicom_source_files, read_image
from UniversalSegLib.io.nifti import merge_label_map, write_class_masks, write_label_map
from UniversalSegLib.io.preview import write_preview
from UniversalSegLib.io.segnrrd import write_seg_nrrd
from UniversalSegLib.io.stats import compute_statistics, write_statistics
from UniversalSegLib.io.writers import DEFAULT_FORMATS, FORMATS, parse_formats, write_outputs

__all__ = [
    "DEFAULT_FORMATS", "DicomSeriesWarning", "FORMATS", "NonCTWarning", "atomic_dir", "atomic_write", "check_image",
    "compute_statistics", "dicom_source_files", "merge_label_map", "parse_formats", "read_image", "write_class_masks",
    "write_dicom_seg", "write_dicom_series", "write_label_map", "write_outputs", "write_preview", "write_seg_nrrd",
    "write_statistics",
]
