"""Cohorts: segment thousands of CTs with one command, resume after a crash, spread over GPUs and nodes.

    discovery  -- the cases of a cohort: files, DICOM trees (CT series only), CSV/JSON case lists
    record     -- per-case records and the model/settings identity that makes a rerun resume
    runner     -- one loaded model over many cases, reading ahead, each case's failure isolated
    table      -- the long-format cohort table and the run report
    progress   -- one bar (or JSON lines) for the whole cohort
    api        -- `predict_many`, for notebooks
    command    -- `universalseg cohort`, also under torchrun (docs/cohort.md)
"""

from UniversalSegLib._lazy import lazy_getattr

_LAZY = {
    "predict_many": "UniversalSegLib.cohort.api",
    "CaseResult": "UniversalSegLib.cohort.runner",
    "CohortRunner": "UniversalSegLib.cohort.runner",
    "discover_cases": "UniversalSegLib.cohort.discovery",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
__all__ = list(_LAZY)
