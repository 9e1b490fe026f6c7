"""The cohort table (one row per case and structure) and the run report (one row per case).

Both are rebuilt from the per-case records and replaced atomically, so a reader (or a crash)
never sees half a file, and a resumed run ends with exactly the table an uninterrupted run writes.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from UniversalSegLib.cohort.discovery import Case
from UniversalSegLib.cohort.record import ModelIdentity, Settings, complete_record
from UniversalSegLib.io.atomic import atomic_write
from UniversalSegLib.io.stats import COLUMNS

TABLE_FILE = "cohort.csv"
REPORT_CSV, REPORT_JSON = "run_report.csv", "run_report.json"
TABLE_COLUMNS = ("case_id", *COLUMNS)
REPORT_COLUMNS = ("case_id", "status", "reason", "seconds", "input", "rank")


class CohortTable:
    """Rows of the finished cases, gathered from their records on disk (whichever rank wrote them).

    `refresh` looks only at cases not yet gathered (one `stat` each), so it stays cheap for large
    cohorts; `write` lists the cases in cohort order, structures in model order.
    """

    def __init__(self, out: Path, cases: Sequence[Case], identity: ModelIdentity, settings: Settings):
        self.out, self.cases, self.identity, self.settings = out, list(cases), identity, settings
        self.rows: dict[str, list[dict]] = {}

    def add(self, case_id: str, statistics: list[dict]) -> None:
        self.rows[case_id] = statistics

    def refresh(self) -> None:
        for case in self.cases:
            if case.case_id not in self.rows and (self.out / case.case_id).is_dir():
                record = complete_record(self.out / case.case_id, case.path, self.identity, self.settings)
                if record is not None:
                    self.rows[case.case_id] = record["statistics"]

    def write(self) -> Path:
        path = self.out / TABLE_FILE
        with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            for case in self.cases:
                for row in self.rows.get(case.case_id, []):
                    writer.writerow({"case_id": case.case_id, **row})
        return path


def write_run_report(out: Path, rows: Iterable[dict[str, Any]], notes: Sequence[str],
                     identity: ModelIdentity, settings: Settings, wall_s: float) -> tuple[Path, Path]:
    """Write `run_report.csv` (a row per case: ok / skipped / refused / failed, reason, seconds) and
    `run_report.json` (the same plus counts, discovery notes, the model, settings and failures' details)."""
    rows = sorted(rows, key=lambda r: r["case_id"])
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "refused", "failed")}
    with atomic_write(out / REPORT_CSV) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    document = {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(wall_s, 1),
                "counts": counts, "model": identity.__dict__, "settings": settings.to_dict(),
                "notes": list(notes), "cases": rows}
    with atomic_write(out / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return out / REPORT_CSV, out / REPORT_JSON
