"""`predict_many`: segment a cohort from Python (a notebook), one result at a time."""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from UniversalSegLib.cohort.discovery import Discovery, discover_cases
from UniversalSegLib.cohort.runner import CaseResult, CohortRunner, ProgressFn
from UniversalSegLib.cohort.table import CohortTable, write_run_report


class SkippedInputWarning(UserWarning):
    """An input found while searching for cases is not a CT scan we segment (e.g. a localiser or an MR series)."""


def predict_many(inputs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike], model: Any = None,
                 classes: Sequence[str] | None = None, *, output: str | os.PathLike | None = None,
                 device: str = "auto", fast: bool = False, formats: str | Sequence[str] | None = None,
                 allow_non_ct: bool = False, progress: ProgressFn | None = None) -> Iterator[CaseResult]:
    """Segment every case of `inputs` with one loaded model; yields a `CaseResult` per case.

    Example::

        for case in us.predict_many(["/data/cohort"], classes=["liver", "spleen"], output="/data/out"):
            print(case.case_id, case.status, case.reason or case.statistics[0]["volume_ml"])

    Args:
        inputs: image files, DICOM series or folder trees, `.csv`/`.json` case lists, or {case id: path}.
        model: model name or folder, or a `LoadedModel` (default: the bundled model).
        classes: structures to segment (default: all the model's classes).
        output: a cohort folder (per-case outputs, `cohort.csv`, run report; a rerun resumes).
            None writes nothing: each "ok" result carries its `SegmentationResult` only.
        device, fast, allow_non_ct: as in `predict`.
        formats: output formats with `output` (default: seg.nrrd, nifti, stats, plus dicom-seg for DICOM).
        progress: called as progress(fraction of the cases to compute, message).

    Bad cases do not stop the run: they come back with status "refused" or "failed" and a reason.
    Cases an earlier run into `output` finished with the same model and settings come back first,
    as "skipped" (statistics from their record, no `result`). Inputs skipped while searching (a
    localiser, a non-CT DICOM series) are reported as `SkippedInputWarning`. Arguments are checked
    now; the cases run as the iterator is consumed, in this process (for several GPUs use
    `universalseg cohort` under torchrun).
    """
    discovery = discover_cases(inputs, exclude=[output] if output is not None else ())
    for note in discovery.notes:
        warnings.warn(note, SkippedInputWarning, stacklevel=2)
    runner = CohortRunner(model, classes, device=device, fast=fast, formats=formats, allow_non_ct=allow_non_ct,
                          output=output)
    runner.claim_output()
    return _results(runner, discovery, progress)


def _results(runner: CohortRunner, discovery: Discovery, progress: ProgressFn | None) -> Iterator[CaseResult]:
    start = time.perf_counter()
    done, todo = runner.finished_before(discovery.cases)
    table = CohortTable(runner.output, discovery.cases, runner.identity, runner.settings) if runner.output else None
    rows = []
    try:
        for result in itertools.chain(done, runner.run(todo, progress)):
            rows.append(result.report_row())
            if table is not None and result.ok:
                table.add(result.case_id, result.statistics)
            yield result
    finally:  # also when the caller stops early: the table and report show what is finished
        if table is not None:
            table.write()
            write_run_report(runner.output, rows, discovery.notes, runner.identity, runner.settings,
                             time.perf_counter() - start)
