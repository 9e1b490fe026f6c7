"""Write a 3D image as a DICOM CT series (one file per slice), e.g. to test or demonstrate DICOM input and SEG.

The files carry the tags that readers need to rebuild the geometry (position, orientation,
spacing, frame of reference) and the study/series identity a DICOM SEG refers to.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.io.atomic import atomic_dir

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(image: sitk.Image, folder: str | os.PathLike, patient_id: str = "ANON",
                       patient_name: str = "Anonymous^", series_description: str = "CT") -> list[Path]:
    """Write `image` (HU, any orientation) as a CT series of int16 slices in `folder`; returns the files in order.

    The folder is written atomically (it appears complete or not at all) and replaced if it exists.
    """
    from pydicom.uid import generate_uid

    array = sitk.GetArrayViewFromImage(image)
    if array.min() < np.iinfo(np.int16).min or array.max() > np.iinfo(np.int16).max:
        raise ValueError("image values do not fit DICOM int16 pixels")
    volume = sitk.Cast(sitk.Round(image) if np.issubdtype(array.dtype, np.floating) else image, sitk.sitkInt16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1]))
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    common = {
        "0008|0008": "DERIVED\\SECONDARY\\AXIAL", "0008|0016": CT_IMAGE_STORAGE, "0008|0020": now[0],
        "0008|0030": now[1], "0008|0060": "CT", "0008|103e": series_description, "0010|0010": patient_name,
        "0010|0020": patient_id, "0020|000d": generate_uid(), "0020|000e": generate_uid(), "0020|0010": "1",
        "0020|0011": "1", "0020|0052": generate_uid(), "0020|0037": orientation,
        "0018|0050": f"{image.GetSpacing()[2]:.10g}", "0028|1052": "0", "0028|1053": "1", "0028|1054": "HU",
    }
    folder = Path(folder)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # use our UIDs instead of GDCM's
    names = [f"slice_{k:04d}.dcm" for k in range(volume.GetSize()[2])]
    with atomic_dir(folder) as tmp:
        for k, name in enumerate(names):
            slice_ = volume[:, :, k]
            tags = {**common, "0008|0018": generate_uid(), "0020|0013": str(k + 1),
                    "0020|0032": "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))}
            for key, value in tags.items():
                slice_.SetMetaData(key, value)
            writer.SetFileName(str(tmp / name))
            writer.Execute(slice_)
    return [folder / name for name in names]
