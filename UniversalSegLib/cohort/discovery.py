"""Find the cases of a cohort: image files, DICOM series in a folder tree, or a CSV/JSON list.

Every case gets a stable id (the same inputs give the same ids on every run and every rank), which
names its output folder `OUT/<case id>/` and keys the resume records. Ids come from the path
relative to the folder given (`patient1/ct.nii.gz` -> `patient1_ct`), from the file name for a
file given directly, or from the list. Two inputs with the same id are an error, never a silent
overwrite.

DICOM folders are grouped into series by `io.dicom_input.scan_folder`, exactly as `io.read_image`
groups them: CT series are cases; localisers (scouts), non-image objects (SEG, SR, dose reports) and
non-CT series (MR, PET, ...) are skipped with a note. Thin series are cases: `read_image` decides.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from UniversalSegLib.errors import InputError
from UniversalSegLib.io.dicom_input import CT_MODALITY, is_dicom_file, scan_folder

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LIST_SUFFIXES = (".csv", ".json")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Case:
    """One scan to segment: its id (output folder name) and what `io.read_image` reads for it."""

    case_id: str
    path: Path  # an image file, a DICOM series folder, or one file of a DICOM series (that series)


@dataclass
class Discovery:
    """The cases found (sorted by id) and one note per input that was skipped, with the reason."""

    cases: list[Case]
    notes: list[str]


def safe_case_id(text: str) -> str:
    """`text` as a folder name: runs of characters other than letters, digits, '.', '_', '-' become '_'."""
    cleaned = _UNSAFE.sub("_", text).strip("._")
    if not cleaned:
        raise InputError(f"case id {text!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return cleaned


def _image_stem(path: Path) -> str | None:
    """The file name without its image suffix, or None when the file is no image we read."""
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def discover_cases(inputs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                   exclude: Iterable[str | os.PathLike] = ()) -> Discovery:
    """Expand `inputs` into cases.

    Args:
        inputs: paths (image files, DICOM series files or folders, folder trees, `.csv`/`.json` case
            lists), or a mapping {case id: image path}.
        exclude: folders never searched (the cohort's own output folder, so outputs are not inputs).

    Raises InputError for a missing input, an unreadable list, no case at all, or two cases with one id.
    """
    skip = {Path(p).expanduser().resolve() for p in exclude}
    found: list[Case] = []
    notes: list[str] = []
    if isinstance(inputs, Mapping):
        found = [Case(safe_case_id(str(k)), Path(v).expanduser()) for k, v in inputs.items()]
    else:
        for item in inputs:
            path = Path(item).expanduser()
            if not path.exists():
                raise InputError(f"input {path} does not exist")
            if path.is_dir():
                found += _walk(path, skip, notes)
            elif path.name.lower().endswith(LIST_SUFFIXES):
                found += read_case_list(path)
            else:
                found.append(Case(safe_case_id(_image_stem(path) or path.stem), path))
    _check_unique(found)
    if not found:
        raise InputError("no CT image or DICOM CT series found in the inputs"
                         + (f" ({len(notes)} skipped: {notes[0]})" if notes else ""))
    return Discovery(sorted(found, key=lambda c: c.case_id), notes)


def _check_unique(cases: list[Case]) -> None:
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen and seen[case.case_id].resolve() != case.path.resolve():
            raise InputError(f"two inputs would both be case {case.case_id!r} ({seen[case.case_id]} and {case.path}); "
                             "give them distinct ids in a CSV/JSON case list, or pass the folder holding both")
        seen[case.case_id] = case.path
    cases[:] = list({c.case_id: c for c in cases}.values())  # one input given twice is one case


# --- case lists -------------------------------------------------------------------------------------------


def read_case_list(path: Path) -> list[Case]:
    """Cases of a CSV (columns `path` and optionally `case_id`) or JSON list.

    JSON: a list of {"case_id": ..., "path": ...} objects or of paths, or an object {case id: path}.
    Relative paths are relative to the list's folder. A missing case id comes from the file name.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
        entries = _csv_entries(text, path) if path.name.lower().endswith(".csv") else _json_entries(text, path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"cannot read case list {path}: {e}") from None
    cases = []
    for number, (case_id, target) in enumerate(entries, start=1):
        if not target:
            raise InputError(f"case list {path}: entry {number} has no path")
        image = Path(target).expanduser()
        image = image if image.is_absolute() else path.parent / image
        cases.append(Case(safe_case_id(case_id or _image_stem(image) or image.name), image))
    return cases


def _csv_entries(text: str, path: Path) -> list[tuple[str | None, str]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
        raise ValueError("the header needs a 'path' column (and optionally 'case_id')")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return [(row.get("case_id") or None, row["path"]) for row in rows]


def _json_entries(text: str, path: Path) -> list[tuple[str | None, str]]:
    data = json.loads(text)
    if isinstance(data, dict):
        return [(str(k), str(v)) for k, v in data.items()]
    if not isinstance(data, list):
        raise ValueError("expected a list of cases or an object {case id: path}")
    entries = []
    for item in data:
        if isinstance(item, str):
            entries.append((None, item))
        elif isinstance(item, dict) and "path" in item:
            entries.append((item.get("case_id"), str(item["path"])))
        else:
            raise ValueError(f"entry {item!r} is neither a path nor an object with a 'path'")
    return entries


# --- folder trees -------------------------------------------------------------------------------------------


def _walk(root: Path, skip: set[Path], notes: list[str]) -> list[Case]:
    """Image files and DICOM CT series anywhere below `root` (hidden entries and `skip` folders ignored)."""
    cases = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip)
        relative = here.relative_to(root).parts
        dicom = False
        for name in sorted(f for f in files if not f.startswith(".")):
            stem = _image_stem(Path(name))
            if stem is not None:
                cases.append(Case(safe_case_id("_".join([*relative, stem])), here / name))
            elif not dicom and is_dicom_file(here / name):
                dicom = True
        if dicom:
            label = "_".join(relative) or root.resolve().name
            cases += _dicom_series_cases(here, label, notes)
    return cases


def _dicom_series_cases(folder: Path, label: str, notes: list[str]) -> list[Case]:
    """One case per CT series in `folder`; notes for the series and files skipped."""
    scan = scan_folder(folder)
    for reason, count in scan.skipped.most_common():
        notes.append(f"skipped {count} file{'s' * (count > 1)} in {folder}: {reason}")
    series = []
    for stack in scan.stacks:
        if stack.modality != CT_MODALITY:
            notes.append(f"skipped {folder} series {stack.summary()}: modality {stack.modality}, not CT")
        else:
            series.append(stack)
    if len(series) == 1 and len(scan.stacks) == 1:  # the folder is the series: read_image(folder) reads it
        return [Case(safe_case_id(label), folder)]
    numbers = [str(getattr(s.headers[0], "SeriesNumber", "") or "") for s in series]
    return [Case(safe_case_id(f"{label}_s{n}" if n and numbers.count(n) == 1 else f"{label}_{s.series_uid[-12:]}"),
                 s.files[0])  # one file of the series: read_image reads that series
            for s, n in zip(series, numbers)]
