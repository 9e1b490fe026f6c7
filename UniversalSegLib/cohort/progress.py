"""One progress display for a whole cohort: a bar on stderr (cases done, ETA) or JSON lines on stdout.

JSON lines follow the protocol the Slicer module reads from `universalseg predict --progress-json`
(`{"progress": 0.42, "message": "..."}`), with the cohort's counts added:
    {"progress": 0.42, "message": "case 9/20 ct_09: sliding window", "cases_done": 8, "cases_total": 20,
     "eta_s": 61.0}
"""

from __future__ import annotations

import sys
import time

from UniversalSegLib.progress import bar, json_progress

_JSON_EVERY_S = 0.5  # inner progress of a case is thinned out; case boundaries always print


class CohortProgress:
    """Receives (fraction of the cohort, message) from the runner and the count of finished cases.

    Args:
        total: cases this process computes.
        json_lines: JSON lines on stdout instead of the bar.
    """

    def __init__(self, total: int, json_lines: bool):
        self.total, self.json_lines = total, json_lines
        self.done, self.fraction, self.start, self.last_line = 0, 0.0, time.monotonic(), 0.0
        self.bar = None
        if not json_lines:
            self.bar = bar(total=total, unit="case",
                           bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")
            self._describe()

    def eta_s(self) -> float | None:
        if self.fraction <= 0:
            return None
        return (time.monotonic() - self.start) * (1 - self.fraction) / self.fraction

    def __call__(self, fraction: float, message: str) -> None:
        self.fraction = max(self.fraction, min(1.0, fraction))
        if self.bar is not None:
            self.bar.update(self.fraction * self.total - self.bar.n)
            self.bar.set_postfix_str(message[-60:], refresh=False)
        elif time.monotonic() - self.last_line >= _JSON_EVERY_S:
            self._line(message)

    def case_finished(self, case_id: str, status: str) -> None:
        self.done += 1
        self.fraction = max(self.fraction, self.done / self.total if self.total else 1.0)
        if self.bar is not None:
            self.bar.update(self.fraction * self.total - self.bar.n)
            self._describe()
        else:
            self._line(f"case {self.done}/{self.total} {case_id}: {status}")

    def note(self, text: str) -> None:
        """A line for the user on stderr, printed above the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _describe(self) -> None:
        self.bar.set_description_str(f"{self.done}/{self.total} cases", refresh=True)

    def _line(self, message: str) -> None:
        self.last_line = time.monotonic()
        eta = self.eta_s()
        json_progress(self.fraction, message, cases_done=self.done, cases_total=self.total,
                      eta_s=None if eta is None else round(eta, 1))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
