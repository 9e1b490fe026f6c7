"""Write the chosen output formats of one prediction into a folder, all or nothing.

Everything is first written into a hidden staging folder inside `outdir`; only when every writer
has succeeded are the files moved to their final names. A failure leaves `outdir` as it was.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from UniversalSegLib.errors import InputError, UniversalSegWarning
from UniversalSegLib.inference.result import SegmentationResult
from UniversalSegLib.io.atomic import publish
from UniversalSegLib.io.destination import check_destination, destination_error, remove_stale_staging, staging_folder
from UniversalSegLib.io.dicom_input import DicomStack, dicom_seg_problem
from UniversalSegLib.io.dicomseg import write_dicom_seg
from UniversalSegLib.io.image import dicom_source_files
from UniversalSegLib.io.itk_log import capture_itk_output
from UniversalSegLib.io.nifti import write_class_masks, write_label_map
from UniversalSegLib.io.preview import write_preview
from UniversalSegLib.io.segnrrd import write_seg_nrrd
from UniversalSegLib.io.stats import write_statistics

FORMATS = ("seg.nrrd", "nifti", "labelmap", "dicom-seg", "stats", "preview")
# What `predict` writes when the user names no formats; "dicom-seg" is added for DICOM input by the caller.
DEFAULT_FORMATS = ("seg.nrrd", "nifti", "labelmap", "stats")
SEG_NRRD, MASKS_DIR, LABELMAP, DICOM_SEG = "segmentation.seg.nrrd", "masks", "labelmap.nii.gz", "segmentation.dcm"
STATS_CSV, STATS_JSON, PREVIEW = "statistics.csv", "statistics.json", "preview.png"
OUTPUT_NAMES = (SEG_NRRD, MASKS_DIR, LABELMAP, "labelmap.labels.json", "labelmap-colors.csv", DICOM_SEG, STATS_CSV,
                STATS_JSON, PREVIEW)


class EarlierOutputsRemovedWarning(UniversalSegWarning):
    """Outputs of an earlier run that this run did not write were removed from the output folder."""


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """Normalise "seg.nrrd,stats" or a list of names; raise InputError naming any unknown format."""
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise InputError(f"unknown output format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if not names:
        raise InputError(f"no output format given; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def dicom_seg_refusal(sources: Sequence[str | os.PathLike] | DicomStack | None) -> str | None:
    """Why "dicom-seg" cannot be written for an input read from `sources` (its DICOM files), or None.

    Cheap (headers only), so callers check it before the model runs: an explicit request is refused,
    a default one dropped with a warning.
    """
    if not sources:
        return ("DICOM SEG output (dicom-seg) needs a DICOM series as input; the input was not DICOM, "
                "choose other formats")
    problem = dicom_seg_problem(sources)
    return f"DICOM SEG output (dicom-seg) is impossible for this input: {problem}" if problem else None


def _writers(result: SegmentationResult, stage: Path,
             dicom_source: Sequence[Path] | DicomStack | None) -> dict[str, Callable[[], dict[str, Path]]]:
    """Per format, a function writing it into `stage` and returning {output name: staged path}."""
    def labelmap() -> dict[str, Path]:
        files = write_label_map(result, stage / LABELMAP)
        return {"labelmap": files["labelmap"], "labelmap:labels": files["labels"], "labelmap:colors": files["colors"]}

    def masks() -> dict[str, Path]:
        write_class_masks(result, stage / MASKS_DIR)
        return {"nifti": stage / MASKS_DIR}

    def stats() -> dict[str, Path]:
        write_statistics(result, stage / STATS_CSV, stage / STATS_JSON)
        return {"stats": stage / STATS_CSV, "stats:json": stage / STATS_JSON}

    return {
        "seg.nrrd": lambda: {"seg.nrrd": write_seg_nrrd(result, stage / SEG_NRRD)},
        "nifti": masks,
        "labelmap": labelmap,
        "dicom-seg": lambda: {"dicom-seg": write_dicom_seg(result, stage / DICOM_SEG, dicom_source or [])},
        "stats": stats,
        "preview": lambda: {"preview": write_preview(result, stage / PREVIEW)},
    }


def write_outputs(result: SegmentationResult, outdir: str | os.PathLike, formats: str | Sequence[str],
                  dicom_source: Sequence[str | os.PathLike] | DicomStack | None = None,
                  remove_earlier: bool = False) -> dict[str, Path]:
    """Write `formats` (see FORMATS) of `result` into `outdir`; returns {output name: final path}.

    Output names are the format names (the main file, or the masks folder for "nifti") plus
    "labelmap:labels", "labelmap:colors" and "stats:json" for the sidecar files. Files are
    `segmentation.seg.nrrd`, `masks/<key>.nii.gz`, `labelmap.nii.gz` (+ `labelmap.labels.json`,
    `labelmap-colors.csv`), `segmentation.dcm`, `statistics.csv` + `statistics.json`, `preview.png`.

    "dicom-seg" needs the source DICOM files: `dicom_source` (files, or the `DicomStack` read, whose
    headers are then not read again), or else the series `result.reference` was read from by
    `read_image`. Asking for it without a DICOM input, or with one lacking what a SEG must reference
    (`dicom_seg_refusal`), raises InputError before anything is written (it is not
    silently skipped: the user asked for a file they would not get).

    `remove_earlier` (what `universalseg predict` does): once this run's outputs are in place, the
    outputs an earlier run left under our names (`OUTPUT_NAMES`) that this run did not write are
    removed, with an `EarlierOutputsRemovedWarning` naming them, so the folder holds no masks of
    another run. Nothing else is touched, and on failure nothing is removed.
    """
    names = parse_formats(formats)
    sources = None
    if "dicom-seg" in names:
        sources = dicom_source if isinstance(dicom_source, DicomStack) else (
            [Path(f) for f in dicom_source] if dicom_source else dicom_source_files(result.reference))
        refusal = dicom_seg_refusal(sources)
        if refusal:
            raise InputError(refusal)
    outdir = Path(outdir)
    check_destination(outdir)
    created = not outdir.exists()
    stage = staging_folder(outdir)
    try:
        stage.mkdir(parents=True)
        remove_stale_staging(outdir, OUTPUT_NAMES)  # left by a killed run
        writers = _writers(result, stage, sources)
        staged: dict[str, Path] = {}
        with capture_itk_output():  # ITK writers print warnings from C++: they become ITKWarnings
            for name in names:
                staged.update(writers[name]())
        written = {name: publish(path, outdir / path.name) for name, path in staged.items()}
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if created and outdir.exists() and not any(outdir.iterdir()):
            outdir.rmdir()  # leave no trace of a run that produced nothing
        problem = destination_error(outdir, e)  # disk full, read-only...: one line, not a traceback
        if problem is not None:
            raise problem from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if remove_earlier:
        removed = remove_earlier_outputs(outdir, written.values())
        if removed:
            warnings.warn(f"removed the outputs of an earlier run in {outdir} that this run did not write, so the "
                          f"folder holds this run's results only: {', '.join(removed)}",
                          EarlierOutputsRemovedWarning, stacklevel=2)
    return written


def remove_earlier_outputs(outdir: Path, written: Iterable[Path]) -> list[str]:
    """Remove the files our writers produce (`OUTPUT_NAMES`; in the masks folder its `*.nii.gz`) that are in
    `outdir` but not in `written`; returns them as shown to the user. A user's other files stay, and so
    does the masks folder when they put other files into it. A file that cannot be removed is left (and not
    named): this run's outputs are already in place.

    Args:
        outdir: the output folder.
        written: the paths this run wrote into it.
    """
    kept = {Path(p).name for p in written}
    removed = []
    for name in OUTPUT_NAMES:
        path = outdir / name
        if name in kept or path.is_symlink():  # our writers never make links: not ours
            continue
        if name == MASKS_DIR and path.is_dir():
            masks = [m for m in path.glob("*.nii.gz") if m.is_file() and not m.is_symlink() and _removed(m)]
            if masks:
                removed.append(f"{MASKS_DIR}/ ({len(masks)} mask{'s' * (len(masks) > 1)})")
            if not any(path.iterdir()):
                path.rmdir()
        elif name != MASKS_DIR and path.is_file() and _removed(path):
            removed.append(name)
    return removed


def _removed(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:
        return False
    return True



