"""Segment many cases with one loaded model, each case isolated from the others' failures.

The model is loaded once; cases stream through `predict`; the next case is read in a background
thread while the current one is computed (reading a CT takes seconds that would otherwise leave
the GPU or the CPU cores idle). A case whose input is refused (our `UniversalSegError`: not CT,
unreadable, ...) or that fails unexpectedly becomes a `CaseResult` with the reason, and the run
goes on. With an output folder each case is written to `OUT/<case id>/` all at once: outputs and
its `case.json` record go into a hidden temporary folder that is renamed into place last.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from UniversalSegLib.cohort.discovery import Case
from UniversalSegLib.cohort.record import (
    ModelIdentity,
    Settings,
    claim_output_folder,
    complete_record,
    model_identity,
    new_record,
    write_record,
)
from UniversalSegLib.errors import InputError, UniversalSegError
from UniversalSegLib.inference.result import SegmentationResult
from UniversalSegLib.progress import ProgressFn

OK, SKIPPED, REFUSED, FAILED = "ok", "skipped", "refused", "failed"


@dataclass
class CaseResult:
    """What became of one case.

    status: "ok" (segmented now), "skipped" (finished by an earlier run with the same model and
        settings: `statistics` and `outputs` come from its record), "refused" (our one-line
        error, e.g. not a CT) or "failed" (an unexpected error; `detail` holds the traceback).
    """

    case_id: str
    input: Path
    status: str
    reason: str = ""
    seconds: float = 0.0
    result: SegmentationResult | None = None  # only for cases segmented now
    statistics: list[dict] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    detail: str = ""
    rank: int = 0

    @property
    def ok(self) -> bool:
        return self.status in (OK, SKIPPED)

    def report_row(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "status": self.status, "reason": self.reason,
                "seconds": round(self.seconds, 2), "input": str(self.input), "rank": self.rank,
                **({"notes": self.notes} if self.notes else {}), **({"detail": self.detail} if self.detail else {})}


def _read_case(case: Case, allow_non_ct: bool) -> tuple[sitk.Image, list[str]]:
    """The case's image, checked by `io.read_image`, and a note when it was accepted only by allow_non_ct."""
    from UniversalSegLib.io import check_image, read_image

    image = read_image(case.path, allow_non_ct=allow_non_ct)
    notes = []
    if allow_non_ct:
        try:
            check_image(image, name=str(case.path))
        except InputError as e:
            notes.append(f"accepted with allow_non_ct: {e}")
    return image, notes


def _remove_stale_temporaries(out: Path, case_id: str) -> None:
    """Hidden folders that an interrupted write of this case left (see io.atomic); only this case's."""
    pattern = re.compile(rf"\.(tmp|old)-[0-9a-f]{{8}}-{re.escape(case_id)}")
    for entry in out.glob(f".*-{case_id}"):
        if pattern.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)


class CohortRunner:
    """One model and one set of settings, applied case after case.

    Args:
        model: a model name or folder (default: the bundled model), or a `LoadedModel`.
        classes: structures to segment (names, keys or synonyms; default: all the model's classes).
        device: "auto", "cpu", "cuda" or "cuda:N".
        fast: as in `predict`.
        formats: output formats (see `io.FORMATS`); None: the CLI defaults, plus dicom-seg for DICOM cases.
        allow_non_ct: segment images that do not look like CT (noted per case) instead of refusing them.
        output: the cohort's output folder; None writes nothing (results are only returned).
    Unknown models, classes or formats raise here, before any case is read.
    """

    def __init__(self, model: Any = None, classes: Sequence[str] | None = None, *, device: Any = "auto",
                 fast: bool = False, formats: str | Sequence[str] | None = None, allow_non_ct: bool = False,
                 output: str | os.PathLike | None = None):
        from UniversalSegLib.device import resolve_device
        from UniversalSegLib.inference.request import needed_classes
        from UniversalSegLib.io import parse_formats
        from UniversalSegLib.store import LoadedModel, find_model, read_manifest

        self.model = model
        model_dir = model.path if isinstance(model, LoadedModel) else find_model(model)
        wanted, _ = needed_classes(read_manifest(model_dir), classes)
        self.settings = Settings(tuple(c.key for c in wanted), fast,
                                 tuple(parse_formats(formats)) if formats is not None else None, allow_non_ct)
        self.device = resolve_device(device)
        self.output = Path(output).expanduser() if output is not None else None
        self.identity: ModelIdentity | None = model_identity(model_dir) if self.output is not None else None
        self.loaded = None

    def claim_output(self, write: bool = True) -> None:
        """Refuse an output folder of another model or settings; record ours (see record.claim_output_folder)."""
        if self.output is not None:
            if self.output.exists() and not self.output.is_dir():
                raise InputError(f"output {self.output} exists and is not a folder")
            claim_output_folder(self.output, self.identity, self.settings, write=write)

    def finished_before(self, cases: Sequence[Case]) -> tuple[list[CaseResult], list[Case]]:
        """(cases an earlier run finished with this model and settings, as "skipped" results; the others)."""
        done, todo = [], []
        for case in cases:
            folder = self.output / case.case_id if self.output is not None else None
            record = complete_record(folder, case.path, self.identity, self.settings) if folder else None
            if record is None:
                todo.append(case)
            else:
                done.append(CaseResult(case.case_id, case.path, SKIPPED, statistics=record["statistics"],
                                       outputs={k: folder / v for k, v in record["outputs"].items()},
                                       notes=record.get("notes", [])))
        return done, todo

    def run(self, cases: Sequence[Case], progress: ProgressFn | None = None) -> Iterator[CaseResult]:
        """Segment `cases` in order, yielding each one's result as it finishes.

        Args:
            cases: the cases to compute (see `finished_before` for those to skip).
            progress: called as progress(fraction of `cases`, message).
        """
        from UniversalSegLib.inference.predict import load_for_inference

        if not cases:
            return
        if self.loaded is None:
            self.loaded = load_for_inference(self.model, self.device)
        total = len(cases)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="universalseg-read") as reader:
            upcoming = reader.submit(_read_case, cases[0], self.settings.allow_non_ct)
            for index, case in enumerate(cases):
                current = upcoming
                if index + 1 < total:  # read the next case while this one is computed
                    upcoming = reader.submit(_read_case, cases[index + 1], self.settings.allow_non_ct)

                def case_progress(fraction: float, message: str, index: int = index, case: Case = case) -> None:
                    if progress:
                        progress((index + fraction) / total, f"case {index + 1}/{total} {case.case_id}: {message}")

                yield self._process(case, current, case_progress)

    def _process(self, case: Case, image: Future, progress: ProgressFn) -> CaseResult:
        from UniversalSegLib.inference.predict import predict
        from UniversalSegLib.io import compute_statistics
        from UniversalSegLib.io.stats import rounded_row

        start = time.perf_counter()
        try:
            reference, notes = image.result()
            formats = self._formats(reference)
            result = predict(reference, model=self.loaded, classes=list(self.settings.classes), device=self.device,
                             fast=self.settings.fast, progress=progress, allow_non_ct=self.settings.allow_non_ct)
            statistics = [rounded_row(r) for r in compute_statistics(result)]
            outputs = self._write(case, result, formats, statistics, notes, start) if self.output else {}
        except UniversalSegError as e:
            return CaseResult(case.case_id, case.path, REFUSED, str(e), time.perf_counter() - start)
        except Exception as e:  # any other error fails this case only; the traceback goes to the run report
            first = (str(e).strip().splitlines() or [""])[0]
            return CaseResult(case.case_id, case.path, FAILED, f"{type(e).__name__}: {first}",
                              time.perf_counter() - start, detail=traceback.format_exc())
        return CaseResult(case.case_id, case.path, OK, "", time.perf_counter() - start, result, statistics,
                          outputs, notes)

    def _formats(self, reference: sitk.Image) -> list[str]:
        from UniversalSegLib.inference.request import DEFAULT_FORMATS
        from UniversalSegLib.io import dicom_source_files

        if self.output is None:
            return []
        is_dicom = bool(dicom_source_files(reference))
        if self.settings.formats is None:
            return [*DEFAULT_FORMATS, *(["dicom-seg"] if is_dicom else [])]
        if "dicom-seg" in self.settings.formats and not is_dicom:
            raise InputError("DICOM SEG output (dicom-seg) needs a DICOM series as input; this case is not DICOM")
        return list(self.settings.formats)

    def _write(self, case: Case, result: SegmentationResult, formats: list[str], statistics: list[dict],
               notes: list[str], start: float) -> dict[str, Path]:
        from UniversalSegLib.io import atomic_dir, write_outputs

        folder = self.output / case.case_id
        _remove_stale_temporaries(self.output, case.case_id)
        with atomic_dir(folder) as tmp:
            written = write_outputs(result, tmp, formats)
            relative = {name: str(path.relative_to(tmp)) for name, path in written.items()}
            write_record(tmp, new_record(case.case_id, case.path, self.identity, self.settings,
                                         time.perf_counter() - start, relative, statistics, notes))
        return {name: folder / path for name, path in relative.items()}
