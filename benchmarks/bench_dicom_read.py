"""Reading a DICOM series: our pydicom-based reader (io/dicom_input.py) against ITK's series reader.

Baseline: what `read_image` did before issue 22, SimpleITK's GDCM series discovery
(GetGDCMSeriesIDs / GetGDCMSeriesFileNames) and ImageSeriesReader. Candidate: the reader now,
`find_series` + `read_stack` (every header read with pydicom, geometry from the positions, pixels
decoded by pydicom); the CT checks `read_image` runs after either are left out. Series: the bundled
sample CT (122 x 101 pixels per slice) and the same resampled to 512 x 512 pixels (a clinical
matrix), each as uncompressed int16 slices and JPEG 2000 compressed. Each reader runs `--repeats`
times; the best time of each is reported (the machine is shared: the minimum is the fairest figure).

    python -m benchmarks.bench_dicom_read [--repeats 3]    # from the repository root (imports Testing.support)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless

from Testing.support import write_dicom_series
from UniversalSegLib.io.dicom_input import find_series, read_stack

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"


def itk_series_read(folder: Path) -> sitk.Image:
    """The reader before issue 22: GDCM's largest series, ITK's series reader."""
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def ours(folder: Path) -> sitk.Image:
    return read_stack(find_series(folder))


def clinical_matrix(image: sitk.Image) -> sitk.Image:
    """`image` resampled to 512 x 512 pixels per slice over the same field of view."""
    size = image.GetSize()
    spacing = [image.GetSpacing()[0] * size[0] / 512, image.GetSpacing()[1] * size[1] / 512, image.GetSpacing()[2]]
    return sitk.Resample(image, [512, 512, size[2]], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                         image.GetDirection())


def compress_copy(files: list[Path], folder: Path) -> None:
    folder.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(JPEG2000Lossless)
        ds.save_as(folder / f.name, enforce_file_format=True)


def best_of(function, folder: Path, repeats: int) -> tuple[float, sitk.Image]:
    times, image = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        image = function(folder)
        times.append(time.perf_counter() - t)
    return min(times), image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sample = sitk.ReadImage(str(SAMPLE))
    with tempfile.TemporaryDirectory() as tmp:
        for label, image in (("sample", sample), ("512x512", clinical_matrix(sample))):
            files = write_dicom_series(image, Path(tmp) / label / "plain")
            compress_copy(files, Path(tmp) / label / "j2k")
            size = "x".join(map(str, image.GetSize()))
            for name in ("plain", "j2k"):
                folder = Path(tmp) / label / name
                itk_s, itk_image = best_of(itk_series_read, folder, args.repeats)
                ours_s, ours_image = best_of(ours, folder, args.repeats)
                same = np.array_equal(sitk.GetArrayViewFromImage(itk_image), sitk.GetArrayViewFromImage(ours_image))
                print(f"{size:12} {name:6} ITK series reader (baseline) {itk_s:6.3f} s | ours {ours_s:6.3f} s | "
                      f"ratio {ours_s / itk_s:4.2f} | same voxels: {same}")


if __name__ == "__main__":
    main()
