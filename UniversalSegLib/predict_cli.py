"""`universalseg predict INPUT -o OUTDIR ...`: segment a CT and write the chosen formats.

Registered into `universalseg` through `cli.EXTRA_COMMANDS`. Progress goes to a bar on stderr,
or with --progress-json to stdout as one JSON object per line (for the Slicer module):
    {"progress": 0.42, "message": "sliding window"}
    ...
    {"done": true, "outputs": {"seg.nrrd": "/out/segmentation.seg.nrrd", ...}}
The input is read and checked before anything is created, and a failure later removes whatever
this run added to OUTDIR (OUTDIR itself too when this run created it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLI_DEFAULT_FORMATS = ("seg.nrrd", "nifti", "stats")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `predict` sub-command."""
    p = sub.add_parser("predict", help="segment a CT: every requested structure as its own mask",
                       description="Segment a CT (NIfTI, NRRD, MHA/MHD or a DICOM series folder).")
    p.add_argument("input", help="CT image file or DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("--model", default=None, help="model name or folder (default: the bundled model)")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="structures to segment: keys, names or synonyms (default: all the model's classes)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--formats", default=None,
                   help="comma-separated: seg.nrrd,nifti,labelmap,dicom-seg,stats,preview "
                        f"(default: {','.join(CLI_DEFAULT_FORMATS)}, plus dicom-seg for DICOM input)")
    p.add_argument("--fast", action="store_true", help="fewer windows (overlap 0.25) and, on CPUs with native "
                   "bfloat16, a bfloat16 backbone: 2-5x faster, slightly rougher borders")
    p.add_argument("--allow-non-ct", action="store_true", help="segment an image that does not look like CT")
    p.add_argument("--series", default=None, metavar="UID",
                   help="DICOM folder with several series: the SeriesInstanceUID to segment (default: the CT "
                        "series with the most slices; a warning names it)")
    p.add_argument("--progress-json", action="store_true",
                   help="print progress as JSON lines on stdout instead of a progress bar")
    p.set_defaults(func=run_predict)


def _formats(arg: str | None, image) -> list[str]:
    """The formats to write; dicom-seg is checked against the source now, before the model runs.

    Asked for (--formats) and impossible: refused. Only a default: dropped with a one-line warning.
    """
    from UniversalSegLib.errors import InputError
    from UniversalSegLib.io import dicom_source_files, parse_formats
    from UniversalSegLib.io.writers import dicom_seg_refusal

    sources = dicom_source_files(image)
    if arg is not None:
        formats = parse_formats(arg)
        refusal = dicom_seg_refusal(sources) if "dicom-seg" in formats else None
        if refusal:
            raise InputError(refusal)
        return formats
    if not sources:
        return list(CLI_DEFAULT_FORMATS)
    refusal = dicom_seg_refusal(sources)
    if refusal:
        _warn(f"{refusal}; writing {', '.join(CLI_DEFAULT_FORMATS)} without it")
        return list(CLI_DEFAULT_FORMATS)
    return [*CLI_DEFAULT_FORMATS, "dicom-seg"]


def _warn(message: str) -> None:
    print(f"universalseg: warning: {message}", file=sys.stderr, flush=True)


def _read_with_one_line_warnings(path: Path, allow_non_ct: bool, series_uid: str | None):
    """read_image, its warnings (which series was used, a filled slice, non-CT) each on one line."""
    from UniversalSegLib.io import read_image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        image = read_image(path, allow_non_ct=allow_non_ct, series_uid=series_uid)
    for w in caught:
        if issubclass(w.category, UserWarning):
            _warn(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return image


@contextmanager
def _warnings_on_one_line() -> Iterator[None]:
    """Our warnings raised inside the block (e.g. the structures a thin scan cuts off, ITK's messages)
    printed afterwards as `universalseg: warning:` lines; other warnings shown as Python shows them."""
    from UniversalSegLib.errors import UniversalSegWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UniversalSegWarning)
        yield
    for w in caught:
        if issubclass(w.category, UniversalSegWarning):
            _warn(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _remove_new(outdir: Path, existed: bool, before: set[str]) -> None:
    """Undo this run's traces in `outdir`: the folder if we made it, else the entries we added."""
    if not outdir.exists():
        return
    if not existed:
        shutil.rmtree(outdir, ignore_errors=True)
        return
    for entry in outdir.iterdir():
        if entry.name not in before:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _check_model_and_classes(model: str | None, classes: list[str] | None) -> None:
    """Unknown model or class names, and a refused model (store.check_model), fail here, before the run starts."""
    from UniversalSegLib.inference.predict import needed_classes
    from UniversalSegLib.store import check_model, find_model

    needed_classes(check_model(find_model(model)), classes)


def run_predict(args: argparse.Namespace) -> int:
    from UniversalSegLib.device import resolve_device
    from UniversalSegLib.errors import InputError
    from UniversalSegLib.inference.predict import predict
    from UniversalSegLib.io import NonCTWarning, write_outputs
    from UniversalSegLib.io.destination import check_destination, output_size_bound
    from UniversalSegLib.progress import FractionBar, ProgressFn, json_progress

    input_path, outdir = Path(args.input).expanduser(), Path(args.output).expanduser()
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"output {outdir} exists and is not a folder")
    # every input check, before any output
    image = _read_with_one_line_warnings(input_path, args.allow_non_ct, args.series)
    check_destination(outdir, output_size_bound(image))  # writable, room enough: before the model runs
    formats = _formats(args.formats, image)
    resolve_device(args.device)
    _check_model_and_classes(args.model, args.classes)
    existed = outdir.exists()
    before = {e.name for e in outdir.iterdir()} if existed else set()
    bar = None if args.progress_json else FractionBar()
    progress: ProgressFn = json_progress if args.progress_json else bar
    try:
        with _warnings_on_one_line():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonCTWarning)  # read_image has already warned
                result = predict(image, model=args.model, classes=args.classes, device=args.device, fast=args.fast,
                                 progress=progress, allow_non_ct=args.allow_non_ct)
            outputs = write_outputs(result, outdir, formats)
    except BaseException:
        _remove_new(outdir, existed, before)
        raise
    finally:
        if bar is not None:
            bar.close()
    if args.progress_json:
        print(json.dumps({"done": True, "outputs": {k: str(v) for k, v in outputs.items()}}), flush=True)
    else:
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return 0
