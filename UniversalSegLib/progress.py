"""Progress, in one place: the protocol long calls report through, a bar on stderr, and JSON lines on stdout.

The protocol is `progress(fraction, message)`, the fraction rising from 0 to 1 over the whole call
(`predict`, `predict_many`, `extend_model`). Work counted in items (cases of a preprocessing cache)
reports `count(done, total, label)` instead. The command line shows either as a tqdm bar on stderr,
or, with `--progress-json`, as JSON lines on stdout, the protocol the Slicer module reads:
    {"progress": 0.42, "message": "sliding window"}
A command may add fields to a line (a cohort's case counts, an extension's loss) and ends with a
`{"done": ...}` line of its own.

Standard library only at import time (tqdm loads when a bar is made): the CLI imports this for every start.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import Any

ProgressFn = Callable[[float, str], None]
CountFn = Callable[[int, int, str], None]
_BAR_STEPS = 1000  # resolution of a fraction bar
# print() writes the text and its newline separately: two threads (a cohort reads the next case while the
# current one runs) could interleave them into one unreadable line. One write of the whole line, locked.
_STDOUT_LOCK = threading.Lock()


class Monotonic:
    """Forwards (fraction, message) to a callback (which may be None), never going backwards or past 1."""

    def __init__(self, callback: ProgressFn | None):
        self.callback, self.last = callback, 0.0

    def __call__(self, fraction: float, message: str) -> None:
        self.last = max(self.last, min(1.0, fraction))
        if self.callback:
            self.callback(self.last, message)

    def span(self, start: float, end: float) -> ProgressFn:
        """A callback whose 0..1 covers [start, end] of this one (a stage of the whole call)."""
        return within(self, start, end)


def within(callback: ProgressFn, start: float, end: float) -> ProgressFn:
    """`callback` seen from a stage that covers [start, end] of the whole: its fraction 0..1 (clamped) maps there.

    Args:
        callback: the whole call's progress.
        start, end: the stage's share of it.
    """
    return lambda fraction, message: callback(start + (end - start) * min(max(fraction, 0.0), 1.0), message)


def bar(**options: Any):
    """A tqdm bar on stderr that fits the terminal; `options` go to tqdm (total, initial, desc, unit, ...)."""
    from tqdm.auto import tqdm

    return tqdm(**{"file": sys.stderr, "dynamic_ncols": True, **options})


class FractionBar:
    """A bar driven by the protocol: (fraction, message) callbacks; `close()` when done."""

    def __init__(self) -> None:
        self.bar = bar(total=_BAR_STEPS, unit="", bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.set_description(message, refresh=False)
        self.bar.update(max(0, int(fraction * _BAR_STEPS) - self.bar.n))

    def close(self) -> None:
        self.bar.close()


class CountBar:
    """A bar driven by counts: (done, total, label) callbacks; it closes itself when done reaches total.

    Args:
        desc: what is counted, shown before the bar (e.g. "preprocessing training cases").
        unit: the item's name.
    """

    def __init__(self, desc: str, unit: str = "case"):
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.bar is None:
            self.bar = bar(total=total, desc=self.desc, unit=self.unit)
        self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


def json_line(**fields: Any) -> None:
    """One JSON object on its own line of stdout, flushed at once (the reader is another process)."""
    line = json.dumps(fields) + "\n"
    with _STDOUT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def json_progress(fraction: float, message: str, **extra: Any) -> None:
    """A protocol call as a JSON line: {"progress": fraction (4 decimals), "message": ..., **extra}."""
    json_line(progress=round(fraction, 4), message=message, **extra)


def stage_lines() -> ProgressFn:
    """A plain display for logs: one stderr line per stage (the message's part before a colon), with its percentage."""
    last: dict[str, str | None] = {"stage": None}

    def show(fraction: float, message: str) -> None:
        stage = message.split(":")[0]
        if stage != last["stage"]:
            print(f"[{fraction:5.1%}] {message}", file=sys.stderr, flush=True)
            last["stage"] = stage

    return show
