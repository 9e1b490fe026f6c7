"""`universalseg predict INPUT -o OUTDIR ...`: segment a CT and write the chosen formats.

Registered into `universalseg` through `cli.EXTRA_COMMANDS`. Progress goes to a bar on stderr,
or with --progress-json to stdout as one JSON object per line (for the Slicer module):
    {"progress": 0.42, "message": "sliding window"}
    ...
    {"done": true, "outputs": {"seg.nrrd": "/out/segmentation.seg.nrrd", ...}}
The input is read and checked before anything is created, and a failure later removes whatever
this run added to OUTDIR (OUTDIR itself too when this run created it); a run that succeeds removes the
outputs an earlier run left in OUTDIR in formats it did not write, and names them in a warning line.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
                        "(default: seg.nrrd,nifti,stats, plus dicom-seg for DICOM input)")
    p.add_argument("--fast", action="store_true", help="fewer windows (overlap 0.25) and, on CPUs with native "
                   "bfloat16, a bfloat16 backbone: 2-5x faster, slightly rougher borders")
    p.add_argument("--full-grid", action="store_true",
                   help="with --classes: run the windows over the whole scan, so each mask is exactly as in a run "
                        "of all classes (default: only around the requested classes, found by a coarse pass: "
                        "2-5x faster, masks within the model's window-placement noise)")
    p.add_argument("--allow-non-ct", action="store_true", help="segment an image that does not look like CT")
    p.add_argument("--series", default=None, metavar="UID",
                   help="DICOM folder with several series: the SeriesInstanceUID to segment (default: the CT "
                        "series with the most slices; a warning names it)")
    p.add_argument("--progress-json", action="store_true",
                   help="print progress as JSON lines on stdout instead of a progress bar")
    p.set_defaults(func=run_predict)


def _warn(message: str) -> None:
    print(f"universalseg: warning: {message}", file=sys.stderr, flush=True)


@contextmanager
def _warnings_on_one_line(category: type[Warning] | None = None) -> Iterator[None]:
    """Warnings of `category` raised inside the block (default: ours, e.g. the structures a thin scan cuts
    off, ITK's messages) printed afterwards as `universalseg: warning:` lines; other warnings shown as
    Python shows them."""
    from UniversalSegLib.errors import UniversalSegWarning

    category = category or UniversalSegWarning
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", category)
            yield
    finally:  # also when the block fails: a warning may explain the error that follows it
        for w in caught:
            if issubclass(w.category, category):
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


def run_predict(args: argparse.Namespace) -> int:
    from UniversalSegLib.errors import InputError
    from UniversalSegLib.inference.predict import predict
    from UniversalSegLib.inference.request import PredictSettings, resolve_request
    from UniversalSegLib.io import write_outputs
    from UniversalSegLib.progress import FractionBar, ProgressFn, json_line, json_progress

    for what, value in (("input", args.input), ("output folder (-o)", args.output)):
        if not value.strip():  # Path("") is the current folder: an unset shell variable would write there
            raise InputError(f"the {what} is an empty path")
    # every check, once, before any output (the input's own warnings, e.g. which series, on one line each)
    with _warnings_on_one_line(UserWarning):
        request = resolve_request(Path(args.input).expanduser(), args.model, args.classes, args.device,
                                  allow_non_ct=args.allow_non_ct, series_uid=args.series,
                                  output=Path(args.output).expanduser(), formats=args.formats,
                                  settings=PredictSettings(fast=args.fast, subset_windows=not args.full_grid))
    outdir = request.output
    existed = outdir.exists()
    before = {e.name for e in outdir.iterdir()} if existed else set()
    bar = None if args.progress_json else FractionBar()
    progress: ProgressFn = json_progress if args.progress_json else bar
    try:
        with _warnings_on_one_line():
            result = predict(request, progress=progress)
            # the folder then holds this run's outputs only (an earlier run's other formats are removed, named)
            outputs = write_outputs(result, outdir, request.formats, dicom_source=request.source.dicom,
                                    remove_earlier=True)
    except BaseException:
        _remove_new(outdir, existed, before)
        raise
    finally:
        if bar is not None:
            bar.close()
    if args.progress_json:
        json_line(done=True, outputs={k: str(v) for k, v in outputs.items()})
    else:
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return 0
