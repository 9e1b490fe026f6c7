"""Benchmark: what the pre-read checks of `read_image` cost (header against file, ITK output capture).

Baseline, measured in the same run: ITK's plain `sitk.ReadImage` of the same file. Three files:
  sample        the bundled sample CT (.nii.gz, 122x101x112 int32): the gzip trailer decides
  large         a 512x512x300 int16 CT-like volume (.nii.gz, 150 MiB raw): the trailer decides
  large-2-gz    the same as two concatenated gzip members: the trailer cannot decide, so the
                stream is decompressed once more to count its bytes (the slow path)

    OMP_NUM_THREADS=1 python benchmarks/bench_input_checks.py [--repeat 3]

Prints, per file, the median seconds of the header check alone, of read_image, and of the
baseline, and read_image / baseline.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from _common import REPO, median_seconds, require_checkout  # benchmarks/_common.py (this script's folder)

require_checkout()

from UniversalSegLib.io import read_image  # noqa: E402
from UniversalSegLib.io.header_checks import check_file_header  # noqa: E402

SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"


def _large(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    body = rng.normal(40, 30, size=(300, 512, 512)).astype(np.int16)
    body[:, :60] = -1000  # air above the body: CT-like, and compressible like a real scan
    image = sitk.GetImageFromArray(body)
    image.SetSpacing((0.8, 0.8, 1.0))
    single = folder / "large.nii.gz"
    sitk.WriteImage(image, str(single), useCompression=True)
    raw = gzip.decompress(single.read_bytes())
    double = folder / "large-2-gz.nii.gz"
    half = len(raw) // 2
    double.write_bytes(gzip.compress(raw[:half], 1) + gzip.compress(raw[half:], 1))
    return single, double


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"sample": SAMPLE, **dict(zip(("large", "large-2-gz"), _large(Path(tmp))))}
        print(f"{'file':12} {'check_s':>8} {'read_image_s':>13} {'sitk_read_s':>12} {'ratio':>6}")
        for name, path in files.items():
            check = median_seconds(lambda p=path: check_file_header(p), args.repeat)
            ours = median_seconds(lambda p=path: read_image(p), args.repeat)
            base = median_seconds(lambda p=path: sitk.ReadImage(str(p)), args.repeat)
            print(f"{name:12} {check:8.3f} {ours:13.3f} {base:12.3f} {ours / base:6.2f}")


if __name__ == "__main__":
    main()
